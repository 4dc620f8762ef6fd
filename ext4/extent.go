package ext4

import (
	"encoding/binary"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the kernel's ext4_chksum: crc32c without the final inversion,
// continuing from seed.
func crc32c(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, castagnoli, p)
}

const (
	extentMagic    = 0xF30A
	maxExtentLen   = 32768
	inodeExtents   = 4   // entries in i_block
	blockExtents   = 340 // (4096-12)/12 entries in a tree block
	extentTailOff  = 12 + blockExtents*12
	maxExtentDepth = 5
)

type extent struct {
	logical uint32
	start   uint64
	len     uint32
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

func putExtentHeader(b []byte, entries, max, depth int) {
	binary.LittleEndian.PutUint16(b[0:], extentMagic)
	binary.LittleEndian.PutUint16(b[2:], uint16(entries))
	binary.LittleEndian.PutUint16(b[4:], uint16(max))
	binary.LittleEndian.PutUint16(b[6:], uint16(depth))
	binary.LittleEndian.PutUint32(b[8:], 0)
}

func putExtent(b []byte, e extent) {
	binary.LittleEndian.PutUint32(b[0:], e.logical)
	binary.LittleEndian.PutUint16(b[4:], uint16(e.len))
	binary.LittleEndian.PutUint16(b[6:], uint16(e.start>>32))
	binary.LittleEndian.PutUint32(b[8:], uint32(e.start))
}

func putIndex(b []byte, logical uint32, leaf uint64) {
	binary.LittleEndian.PutUint32(b[0:], logical)
	binary.LittleEndian.PutUint32(b[4:], uint32(leaf))
	binary.LittleEndian.PutUint16(b[8:], uint16(leaf>>32))
	binary.LittleEndian.PutUint16(b[10:], 0)
}

// extentTree builds the i_block of an inode for extents, allocating and
// writing tree blocks when they do not fit the inode. It returns the number
// of tree blocks used.
func (w *Writer) extentTree(iblock *[60]byte, ino uint32, exts []extent) (uint64, error) {
	*iblock = [60]byte{}
	if len(exts) <= inodeExtents {
		putExtentHeader(iblock[:], len(exts), inodeExtents, 0)
		for i, e := range exts {
			putExtent(iblock[12+12*i:], e)
		}
		return 0, nil
	}
	n := treeBlocks(len(exts))
	runs, err := w.allocBlocks(n)
	if err != nil {
		return 0, err
	}
	var blocks []uint64
	for _, r := range runs {
		for b := r.start; b < r.end(); b++ {
			blocks = append(blocks, b)
		}
	}
	seed := w.inodeSeed(ino)
	type node struct {
		logical uint32
		block   uint64
	}
	var level []node
	buf := make([]byte, blockSize)
	next := 0
	writeNode := func(entries, depth int, fill func(i int, b []byte)) (uint64, error) {
		clear(buf)
		putExtentHeader(buf, entries, blockExtents, depth)
		for i := 0; i < entries; i++ {
			fill(i, buf[12+12*i:])
		}
		binary.LittleEndian.PutUint32(buf[extentTailOff:], crc32c(seed, buf[:extentTailOff]))
		blk := blocks[next]
		next++
		return blk, w.writeBlock(blk, buf)
	}
	for i := 0; i < len(exts); i += blockExtents {
		chunk := exts[i:min(i+blockExtents, len(exts))]
		blk, err := writeNode(len(chunk), 0, func(j int, b []byte) { putExtent(b, chunk[j]) })
		if err != nil {
			return 0, err
		}
		level = append(level, node{chunk[0].logical, blk})
	}
	depth := 1
	for len(level) > inodeExtents {
		var up []node
		for i := 0; i < len(level); i += blockExtents {
			chunk := level[i:min(i+blockExtents, len(level))]
			blk, err := writeNode(len(chunk), depth, func(j int, b []byte) { putIndex(b, chunk[j].logical, chunk[j].block) })
			if err != nil {
				return 0, err
			}
			up = append(up, node{chunk[0].logical, blk})
		}
		level = up
		depth++
	}
	if depth > maxExtentDepth {
		return 0, ErrTooLarge
	}
	putExtentHeader(iblock[:], len(level), inodeExtents, depth)
	for i, nd := range level {
		putIndex(iblock[12+12*i:], nd.logical, nd.block)
	}
	return n, nil
}
