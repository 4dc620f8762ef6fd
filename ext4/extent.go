package ext4

import "github.com/nixvm-image/nixvm-image/ext4/ondisk"

const (
	maxExtentLen   = ondisk.MaxExtentLen
	inodeExtents   = 4   // entries in i_block
	blockExtents   = 340 // (4096-12)/12 entries in a tree block
	extentTailOff  = 12 + blockExtents*12
	maxExtentDepth = ondisk.MaxExtentDepth
)

type extent struct {
	logical uint32
	start   uint64
	len     uint32
}

func (e extent) put(b []byte) {
	ondisk.Extent{Logical: e.logical, Start: e.start, Len: uint16(e.len)}.Put(b)
}

// runsToExtents splits block runs into extents of at most 32768 blocks,
// numbered from the logical block first.
func runsToExtents(runs []blockRange, first uint32) []extent {
	var out []extent
	l := first
	for _, r := range runs {
		s, n := r.start, r.len
		for n > 0 {
			k := min(n, maxExtentLen)
			out = append(out, extent{l, s, uint32(k)})
			l += uint32(k)
			s += k
			n -= k
		}
	}
	return out
}

// treeBlocks is the number of extent tree blocks n extents need.
func treeBlocks(n int) uint64 {
	if n <= inodeExtents {
		return 0
	}
	total := uint64(0)
	level := n
	for level > inodeExtents {
		level = (level + blockExtents - 1) / blockExtents
		total += uint64(level)
	}
	return total
}

// extentNode is a tree node made: the first logical block under it and
// where it is.
type extentNode struct {
	logical uint32
	block   uint64
}

// extentTree builds the i_block of an inode for extents, allocating and
// writing tree blocks when they do not fit the inode. It returns the number
// of tree blocks used.
func (w *Writer) extentTree(iblock *[60]byte, ino uint32, exts []extent) (uint64, error) {
	*iblock = [60]byte{}
	if len(exts) <= inodeExtents {
		ondisk.ExtentHeader{Entries: uint16(len(exts)), Max: inodeExtents}.Put(iblock[:])
		for i, e := range exts {
			e.put(iblock[12+12*i:])
		}
		return 0, nil
	}
	n := treeBlocks(len(exts))
	runs, err := w.allocBlocks(n)
	if err != nil {
		return 0, err
	}
	tw := &treeWriter{w: w, seed: w.inodeSeed(ino), buf: make([]byte, blockSize)}
	for _, r := range runs {
		for b := r.start; b < r.end(); b++ {
			tw.blocks = append(tw.blocks, b)
		}
	}
	level, err := tw.leaves(exts)
	if err != nil {
		return 0, err
	}
	depth := 1
	for len(level) > inodeExtents {
		if level, err = tw.index(level, depth); err != nil {
			return 0, err
		}
		depth++
	}
	if depth > maxExtentDepth {
		return 0, ErrTooLarge
	}
	ondisk.ExtentHeader{Entries: uint16(len(level)), Max: inodeExtents, Depth: uint16(depth)}.Put(iblock[:])
	for i, nd := range level {
		ondisk.ExtentIndex{Logical: nd.logical, Leaf: nd.block}.Put(iblock[12+12*i:])
	}
	return n, nil
}

// treeWriter writes the tree blocks of one inode into blocks, in order.
type treeWriter struct {
	w      *Writer
	seed   uint32
	blocks []uint64
	next   int
	buf    []byte
}

// leaves writes the leaf blocks of exts.
func (tw *treeWriter) leaves(exts []extent) ([]extentNode, error) {
	var level []extentNode
	for i := 0; i < len(exts); i += blockExtents {
		chunk := exts[i:min(i+blockExtents, len(exts))]
		blk, err := tw.node(len(chunk), 0, func(j int, b []byte) { chunk[j].put(b) })
		if err != nil {
			return nil, err
		}
		level = append(level, extentNode{chunk[0].logical, blk})
	}
	return level, nil
}

// index writes the index blocks at depth over the nodes of the level below.
func (tw *treeWriter) index(below []extentNode, depth int) ([]extentNode, error) {
	var level []extentNode
	for i := 0; i < len(below); i += blockExtents {
		chunk := below[i:min(i+blockExtents, len(below))]
		blk, err := tw.node(len(chunk), depth, func(j int, b []byte) {
			ondisk.ExtentIndex{Logical: chunk[j].logical, Leaf: chunk[j].block}.Put(b)
		})
		if err != nil {
			return nil, err
		}
		level = append(level, extentNode{chunk[0].logical, blk})
	}
	return level, nil
}

// node writes the next tree block: entries filled by fill, and its
// checksum.
func (tw *treeWriter) node(entries, depth int, fill func(i int, b []byte)) (uint64, error) {
	buf := tw.buf
	clear(buf)
	ondisk.ExtentHeader{Entries: uint16(entries), Max: blockExtents, Depth: uint16(depth)}.Put(buf)
	for i := 0; i < entries; i++ {
		fill(i, buf[12+12*i:])
	}
	if err := ondisk.SetExtentChecksum(buf, tw.seed); err != nil {
		return 0, err
	}
	blk := tw.blocks[tw.next]
	tw.next++
	return blk, tw.w.writeBlock(blk, buf)
}
