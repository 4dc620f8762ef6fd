package ext4

import (
	"fmt"
)

// blockRange is a run of blocks [start, start+len).
type blockRange struct {
	start, len uint64
}

func (r blockRange) end() uint64 { return r.start + r.len }

// geometry is the fixed layout of a filesystem: group counts, where each
// group's bitmaps and inode table live and which blocks that metadata
// reserves. It depends only on Options.
type geometry struct {
	blocks    uint64 // s_blocks_count
	groups    uint32
	ipg       uint32 // inodes per group
	itb       uint32 // inode table blocks per group
	gdtBlocks uint32
	journal   uint32 // journal blocks
	bbitmap   []uint64
	ibitmap   []uint64
	itable    []uint64
	reserved  []blockRange // sorted, merged: superblocks, descriptors, bitmaps, inode tables
	metaTotal uint64       // blocks in reserved
}

func (g *geometry) inodes() uint64 { return uint64(g.groups) * uint64(g.ipg) }

// groupBlocks returns the number of blocks in group i (the last may be short).
func (g *geometry) groupBlocks(i uint32) uint64 {
	if i == g.groups-1 {
		return g.blocks - uint64(i)*blocksPerGrp
	}
	return blocksPerGrp
}

// hasSuper reports whether group i holds a superblock backup (sparse_super:
// groups 0, 1 and powers of 3, 5 and 7).
func hasSuper(i uint32) bool {
	if i <= 1 {
		return true
	}
	for _, b := range []uint32{3, 5, 7} {
		n := b
		for n < i {
			n *= b
		}
		if n == i {
			return true
		}
	}
	return false
}

// defaultJournalBlocks is e2fsprogs' ext2fs_default_journal_size.
func defaultJournalBlocks(blocks uint64) uint32 {
	switch {
	case blocks < 2048:
		return 0
	case blocks < 32768:
		return 1024
	case blocks < 256*1024:
		return 4096
	case blocks < 512*1024:
		return 8192
	case blocks < 4096*1024:
		return 16384
	case blocks < 8192*1024:
		return 32768
	case blocks < 16384*1024:
		return 65536
	case blocks < 32768*1024:
		return 131072
	}
	return 262144
}

const (
	minBlocks = 2048    // 8 MiB: the smallest size with a journal
	maxBlocks = 1 << 32 // 16 TiB: keeps every count in 32 bits
)

func newGeometry(o Options) (*geometry, error) {
	if len(o.Label) > 16 {
		return nil, fmt.Errorf("%w: label %q is %d bytes, want at most 16", ErrInvalidOptions, o.Label, len(o.Label))
	}
	if o.Size < 0 {
		return nil, fmt.Errorf("%w: size %d is negative", ErrInvalidOptions, o.Size)
	}
	blocks := uint64(o.Size) / blockSize
	if blocks < minBlocks {
		return nil, fmt.Errorf("%w: size %d bytes is too small, want at least %d", ErrInvalidOptions, o.Size, minBlocks*blockSize)
	}
	if blocks > maxBlocks {
		return nil, fmt.Errorf("%w: size %d bytes is too large, want at most %d", ErrInvalidOptions, o.Size, int64(maxBlocks)*blockSize)
	}
	for {
		g, err := groupGeometry(blocks, o.Inodes)
		if err != nil {
			return nil, err
		}
		// The last group must hold its metadata and some data, else it
		// is dropped, as mke2fs does.
		last := g.groups - 1
		overhead := g.backup(last)
		if last%flexSize == 0 {
			overhead += uint64(g.groups-last) * g.perGroup()
		}
		if g.groupBlocks(last) >= overhead+50 {
			g.place()
			return g, nil
		}
		if g.groups == 1 {
			return nil, fmt.Errorf("%w: size %d bytes is too small for its metadata", ErrInvalidOptions, o.Size)
		}
		blocks = uint64(last) * blocksPerGrp
	}
}

// groupGeometry returns the group counts of a file system of blocks blocks
// with (about) inodes inodes, 0 meaning one per 16 KiB.
func groupGeometry(blocks uint64, inodes uint32) (*geometry, error) {
	g := &geometry{blocks: blocks}
	g.groups = uint32((blocks + blocksPerGrp - 1) / blocksPerGrp)
	want := uint64(inodes)
	if want == 0 {
		want = blocks * blockSize / 16384
	}
	ipg := (want + uint64(g.groups) - 1) / uint64(g.groups)
	ipg = max((ipg+15)&^15, 16)
	if ipg > blocksPerGrp {
		return nil, fmt.Errorf("%w: %d inodes need %d per group, want at most %d", ErrInvalidOptions, want, ipg, blocksPerGrp)
	}
	g.ipg = uint32(ipg)
	g.itb = g.ipg * inodeSize / blockSize
	g.gdtBlocks = uint32((uint64(g.groups)*descSize + blockSize - 1) / blockSize)
	if g.backup(0)+flexSize*g.perGroup() > blocksPerGrp {
		return nil, fmt.Errorf("%w: %d inodes per group do not fit a flex group's first group", ErrInvalidOptions, g.ipg)
	}
	return g, nil
}

// backup is the number of blocks of group i that hold a superblock and
// descriptor table copy.
func (g *geometry) backup(i uint32) uint64 {
	if hasSuper(i) {
		return 1 + uint64(g.gdtBlocks)
	}
	return 0
}

// perGroup is the number of metadata blocks each group has in its flex
// group: two bitmaps and the inode table.
func (g *geometry) perGroup() uint64 { return 2 + uint64(g.itb) }

// place puts each group's bitmaps and inode table at the start of its flex
// group, after the superblock copy, and records every reserved block.
func (g *geometry) place() {
	g.journal = defaultJournalBlocks(g.blocks)
	g.bbitmap = make([]uint64, g.groups)
	g.ibitmap = make([]uint64, g.groups)
	g.itable = make([]uint64, g.groups)
	for i := uint32(0); i < g.groups; i++ {
		start := uint64(i) * blocksPerGrp
		g.reserve(blockRange{start, g.backup(i)})
		if i%flexSize != 0 {
			continue
		}
		n := min(uint32(flexSize), g.groups-i)
		meta := start + g.backup(i)
		for j := uint32(0); j < n; j++ {
			g.bbitmap[i+j] = meta + uint64(j)
			g.ibitmap[i+j] = meta + uint64(n) + uint64(j)
			g.itable[i+j] = meta + 2*uint64(n) + uint64(j)*uint64(g.itb)
		}
		g.reserve(blockRange{meta, uint64(n) * g.perGroup()})
	}
}

// reserve adds r, which follows every range reserved so far, to the
// reserved blocks.
func (g *geometry) reserve(r blockRange) {
	if r.len == 0 {
		return
	}
	g.metaTotal += r.len
	if n := len(g.reserved); n > 0 && g.reserved[n-1].end() == r.start {
		g.reserved[n-1].len += r.len
		return
	}
	g.reserved = append(g.reserved, r)
}

// fixedBlocks is every block the writer uses whatever the tree: metadata,
// the journal with its extent tree, and lost+found.
func (g *geometry) fixedBlocks() uint64 {
	a := newAllocator(g, nil)
	runs, err := a.alloc(uint64(g.journal))
	if err != nil {
		return g.blocks + 1
	}
	return g.metaTotal + uint64(g.journal) + treeBlocks(len(runsToExtents(runs, 0))) + lostFoundBlocks
}

// MinSize returns the smallest Options.Size (with Inodes 0) whose free
// blocks and inodes hold u, after the metadata, the journal and lost+found.
// A size one block smaller does not fit.
func MinSize(u Usage) int64 {
	fits := func(blocks uint64) bool {
		g, err := newGeometry(Options{Size: int64(blocks) * blockSize})
		if err != nil || g.blocks != blocks {
			return false
		}
		fixed := g.fixedBlocks()
		return fixed+u.Blocks <= g.blocks && u.Inodes+firstIno <= g.inodes()
	}
	lo, hi := uint64(minBlocks-1), uint64(minBlocks)
	for !fits(hi) {
		lo = hi
		hi *= 2
		if hi > maxBlocks {
			if !fits(maxBlocks) {
				return -1
			}
			hi = maxBlocks
			break
		}
	}
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if fits(mid) {
			hi = mid
		} else {
			lo = mid
		}
	}
	return int64(hi) * blockSize
}
