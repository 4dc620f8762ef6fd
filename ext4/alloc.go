package ext4

import "fmt"

// allocator hands out data blocks. It sweeps a cursor from the start of the
// filesystem to the end, stepping over the reserved metadata, so that a file
// gets the lowest free blocks, contiguous where the metadata allows.
//
// Every allocation goes through alloc and is recorded in used, in order, so
// that bitmaps can be derived from it and so that a later version can take
// placement hints (keep a path's blocks from a previous image) and report
// where every inode's blocks went.
type allocator struct {
	g      *geometry
	cursor uint64
	ri     int // index of the first reserved range ending after cursor
	free   uint64
	used   []blockRange // allocated runs, sorted, merged
}

func newAllocator(g *geometry) *allocator {
	return &allocator{g: g, free: g.blocks - g.metaTotal}
}

// alloc returns n blocks as runs in ascending order.
func (a *allocator) alloc(n uint64) ([]blockRange, error) {
	if n > a.free {
		return nil, fmt.Errorf("%w: need %d more blocks, %d of %d free", ErrNoSpace, n, a.free, a.g.blocks)
	}
	var runs []blockRange
	for n > 0 {
		for a.ri < len(a.g.reserved) && a.g.reserved[a.ri].end() <= a.cursor {
			a.ri++
		}
		limit := a.g.blocks
		if a.ri < len(a.g.reserved) {
			r := a.g.reserved[a.ri]
			if r.start <= a.cursor {
				a.cursor = r.end()
				continue
			}
			limit = r.start
		}
		if a.cursor >= a.g.blocks {
			return nil, fmt.Errorf("BUG: ext4 allocator ran past the end with %d blocks free", a.free)
		}
		k := min(n, limit-a.cursor)
		r := blockRange{a.cursor, k}
		if l := len(runs); l > 0 && runs[l-1].end() == r.start {
			runs[l-1].len += k
		} else {
			runs = append(runs, r)
		}
		if l := len(a.used); l > 0 && a.used[l-1].end() == r.start {
			a.used[l-1].len += k
		} else {
			a.used = append(a.used, r)
		}
		a.cursor += k
		a.free -= k
		n -= k
	}
	return runs, nil
}
