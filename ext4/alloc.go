package ext4

import (
	"fmt"
	"sort"
)

// allocator hands out data blocks. It sweeps a cursor from the start of the
// filesystem to the end, stepping over the reserved metadata and over the
// blocks kept for units of a previous image (Options.Previous), so that a
// file gets the lowest free blocks, contiguous where the metadata allows.
//
// Every allocation is recorded in used (fresh ones by alloc, replayed ones
// from a previous placement by mark), so that bitmaps can be derived from it.
type allocator struct {
	g      *geometry
	avoid  []blockRange // sorted, merged: metadata and kept blocks
	cursor uint64
	ri     int    // index of the first avoided range ending after cursor
	free   uint64 // blocks the cursor can still hand out
	used   []blockRange
	nused  uint64
}

// newAllocator returns an allocator that never hands out the metadata or
// the blocks of kept (sorted, disjoint from each other and the metadata).
func newAllocator(g *geometry, kept []blockRange) *allocator {
	avoid := g.reserved
	if len(kept) > 0 {
		avoid = mergeAdjacent(mergeRanges(g.reserved, kept))
	}
	var total uint64
	for _, r := range avoid {
		total += r.len
	}
	return &allocator{g: g, avoid: avoid, free: g.blocks - total}
}

// mergeAdjacent merges touching ranges of a sorted, disjoint list.
func mergeAdjacent(rs []blockRange) []blockRange {
	var out []blockRange
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1].end() == r.start {
			out[n-1].len += r.len
			continue
		}
		out = append(out, r)
	}
	return out
}

// appendRun appends r to runs, extending the last run when r continues it.
func appendRun(runs []blockRange, r blockRange) []blockRange {
	if r.len == 0 {
		return runs
	}
	if l := len(runs); l > 0 && runs[l-1].end() == r.start {
		runs[l-1].len += r.len
		return runs
	}
	return append(runs, r)
}

// alloc returns n fresh blocks as runs in ascending order.
func (a *allocator) alloc(n uint64) ([]blockRange, error) {
	if n > a.free {
		return nil, fmt.Errorf("%w: need %d more blocks, %d of %d free", ErrNoSpace, n, a.free, a.g.blocks)
	}
	var runs []blockRange
	for n > 0 {
		for a.ri < len(a.avoid) && a.avoid[a.ri].end() <= a.cursor {
			a.ri++
		}
		limit := a.g.blocks
		if a.ri < len(a.avoid) {
			r := a.avoid[a.ri]
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
		runs = appendRun(runs, r)
		a.mark(r)
		a.cursor += k
		a.free -= k
		n -= k
	}
	return runs, nil
}

// mark records r as used.
func (a *allocator) mark(r blockRange) {
	a.used = appendRun(a.used, r)
	a.nused += r.len
}

// usedSorted returns the used runs sorted and merged.
func (a *allocator) usedSorted() []blockRange {
	s := append([]blockRange(nil), a.used...)
	sort.Slice(s, func(i, j int) bool { return s[i].start < s[j].start })
	return mergeAdjacent(s)
}
