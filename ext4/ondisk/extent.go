package ondisk

import (
	"encoding/binary"
	"fmt"
)

// Extent tree constants (ifork.rst).
const (
	ExtentMagic = 0xF30A
	// ExtentEntrySize is the size of the header and of each entry.
	ExtentEntrySize = 12
	// MaxExtentLen is the longest initialised extent; an ee_len above it
	// marks an unwritten extent of ee_len - MaxExtentLen blocks.
	MaxExtentLen = 32768
	// MaxExtentDepth is the deepest tree the kernel accepts.
	MaxExtentDepth = 5
	// MaxExtentTreeBlocks bounds the tree blocks ExtentWalk.Walk reads: a
	// damaged tree must not make it read forever.
	MaxExtentTreeBlocks = 1 << 20
)

// ExtentHeader is struct ext4_extent_header (eh_generation is written as
// zero).
type ExtentHeader struct {
	Entries, Max, Depth uint16
}

// Put writes the header at the start of b.
func (h ExtentHeader) Put(b []byte) {
	le := binary.LittleEndian
	le.PutUint16(b[0:], ExtentMagic)
	le.PutUint16(b[2:], h.Entries)
	le.PutUint16(b[4:], h.Max)
	le.PutUint16(b[6:], h.Depth)
	le.PutUint32(b[8:], 0)
}

// ParseExtentHeader parses the header at the start of node and checks that
// its entries fit node.
func ParseExtentHeader(node []byte) (ExtentHeader, error) {
	le := binary.LittleEndian
	if len(node) < ExtentEntrySize || le.Uint16(node) != ExtentMagic {
		return ExtentHeader{}, fmt.Errorf("%w: no extent header", ErrCorrupt)
	}
	h := ExtentHeader{Entries: le.Uint16(node[2:]), Max: le.Uint16(node[4:]), Depth: le.Uint16(node[6:])}
	if h.Depth > MaxExtentDepth || ExtentEntrySize*(1+int(h.Entries)) > len(node) {
		return ExtentHeader{}, fmt.Errorf("%w: extent node of depth %d with %d entries in %d bytes", ErrCorrupt, h.Depth, h.Entries, len(node))
	}
	return h, nil
}

// Extent is a leaf entry (struct ext4_extent). Len is ee_len as on disk.
type Extent struct {
	Logical uint32
	Start   uint64
	Len     uint16
}

// Blocks is the number of blocks the extent maps, written or not.
func (e Extent) Blocks() uint64 {
	if e.Len > MaxExtentLen {
		return uint64(e.Len) - MaxExtentLen
	}
	return uint64(e.Len)
}

// Put writes the extent into the 12 bytes at b.
func (e Extent) Put(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], e.Logical)
	le.PutUint16(b[4:], e.Len)
	le.PutUint16(b[6:], uint16(e.Start>>32))
	le.PutUint32(b[8:], uint32(e.Start))
}

// ParseExtent parses the leaf entry at b.
func ParseExtent(b []byte) Extent {
	le := binary.LittleEndian
	return Extent{Logical: le.Uint32(b), Len: le.Uint16(b[4:]), Start: uint64(le.Uint16(b[6:]))<<32 | uint64(le.Uint32(b[8:]))}
}

// ExtentIndex is an index entry (struct ext4_extent_idx): the first logical
// block under it and the tree block it points at.
type ExtentIndex struct {
	Logical uint32
	Leaf    uint64
}

// Put writes the index entry into the 12 bytes at b.
func (x ExtentIndex) Put(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], x.Logical)
	le.PutUint32(b[4:], uint32(x.Leaf))
	le.PutUint16(b[8:], uint16(x.Leaf>>32))
	le.PutUint16(b[10:], 0)
}

// ParseExtentIndex parses the index entry at b.
func ParseExtentIndex(b []byte) ExtentIndex {
	le := binary.LittleEndian
	return ExtentIndex{Logical: le.Uint32(b), Leaf: uint64(le.Uint32(b[4:])) | uint64(le.Uint16(b[8:]))<<32}
}

// SetExtentChecksum stores the checksum of an extent tree block (not the
// root in i_block) in its tail, after eh_max entries: crc32c from the
// owner's InodeSeed over everything before it.
func SetExtentChecksum(b []byte, inodeSeed uint32) error {
	h, err := ParseExtentHeader(b)
	if err != nil {
		return err
	}
	tail := ExtentEntrySize * (1 + int(h.Max))
	if tail+4 > len(b) {
		return fmt.Errorf("%w: extent block of %d entries at most overflows %d bytes", ErrCorrupt, h.Max, len(b))
	}
	binary.LittleEndian.PutUint32(b[tail:], CRC32C(inodeSeed, b[:tail]))
	return nil
}

// ExtentWalk says how Walk reads a tree and what it reports.
type ExtentWalk struct {
	// Read returns tree block n, in a buffer Walk may keep.
	Read func(n uint64) ([]byte, error)
	// Extent, if set, is called for every leaf extent, in logical order.
	Extent func(e Extent) error
	// Node, if set, is called for every tree block below the root once its
	// subtree is walked: its number, depth and bytes (Node may change them
	// and write them back).
	Node func(n uint64, depth int, b []byte) error
}

// Walk walks the extent tree whose root is root (an inode's i_block),
// depth first. Every node must have the magic, fit its block and sit one
// level below its parent; at most MaxExtentTreeBlocks blocks are read.
func (w ExtentWalk) Walk(root []byte) error {
	budget := MaxExtentTreeBlocks
	return w.walk(root, -1, &budget)
}

func (w ExtentWalk) walk(node []byte, wantDepth int, budget *int) error {
	h, err := ParseExtentHeader(node)
	if err != nil {
		return err
	}
	if wantDepth >= 0 && int(h.Depth) != wantDepth {
		return fmt.Errorf("%w: extent node of depth %d below one of depth %d", ErrCorrupt, h.Depth, wantDepth+1)
	}
	for i := range int(h.Entries) {
		e := node[ExtentEntrySize*(1+i):]
		if h.Depth == 0 {
			if w.Extent != nil {
				if err := w.Extent(ParseExtent(e)); err != nil {
					return err
				}
			}
			continue
		}
		if *budget--; *budget < 0 {
			return fmt.Errorf("%w: extent tree of more than %d blocks", ErrCorrupt, MaxExtentTreeBlocks)
		}
		if err := w.child(ParseExtentIndex(e).Leaf, int(h.Depth)-1, budget); err != nil {
			return err
		}
	}
	return nil
}

func (w ExtentWalk) child(n uint64, depth int, budget *int) error {
	b, err := w.Read(n)
	if err != nil {
		return err
	}
	if err := w.walk(b, depth, budget); err != nil {
		return err
	}
	if w.Node != nil {
		return w.Node(n, depth, b)
	}
	return nil
}
