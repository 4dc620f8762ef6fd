package ext4

import (
	"fmt"
	"sort"
)

// Layout-stable writing: placement units, hints and the placement report.
//
// A unit is a named group of entries, typically one Nix store path: the
// headers written between BeginUnit(name) and the next BeginUnit belong to
// it, and so do the blocks of its directories (allocated by Close). The
// entries written before the first BeginUnit, and the journal, belong to
// the unit "".
//
// After Close, Placements reports for every unit the inode numbers and the
// blocks (file data, extent tree blocks, slow symlinks, directory blocks)
// the Writer gave it, in the order it allocated them. Passed back as
// Options.Previous to a new Writer of the same size, the unit of the same
// name gets the same inode numbers and blocks again, in the same order: a
// unit whose headers and data are the same is written to the same bytes
// (given the same UUID and hash seed). A unit that asks for more than it
// had gets the rest from free space; what it leaves over stays free.
//
// Everything else (units without a previous placement) is allocated as
// without hints, stepping over every block and inode that Previous names:
// the lowest free inode numbers and blocks first, so new units fill the
// holes that units left out of Previous have left. Previous should
// therefore name only the units that will be written again: the inodes and
// blocks of a unit that never begins stay unused.

// Range is a run of inode or block numbers [Start, Start+Len).
type Range struct {
	Start, Len uint64
}

// Placement is where a unit's entries went: inode numbers and 4 KiB blocks
// (of the file system), in allocation order.
type Placement struct {
	Inodes []Range
	Blocks []Range
}

type unitState struct {
	name   string
	inodes []blockRange // previous inodes not handed out yet, in order
	blocks []blockRange // previous blocks not handed out yet, in order
	rep    Placement
}

// keptRanges checks Options.Previous against the geometry and returns the
// blocks and inodes it names, sorted.
func keptRanges(g *geometry, prev map[string]Placement) (blocks, inodes []blockRange, err error) {
	names := make([]string, 0, len(prev))
	for n := range prev {
		names = append(names, n)
	}
	sort.Strings(names)
	type owned struct {
		blockRange
		unit string
	}
	var bs, is []owned
	for _, n := range names {
		p := prev[n]
		for _, r := range p.Blocks {
			if r.Len == 0 || r.Start >= g.blocks || r.Len > g.blocks-r.Start {
				return nil, nil, fmt.Errorf("%w: previous unit %q: blocks %d+%d outside the file system of %d blocks", ErrInvalidOptions, n, r.Start, r.Len, g.blocks)
			}
			bs = append(bs, owned{blockRange{r.Start, r.Len}, n})
		}
		for _, r := range p.Inodes {
			if r.Len == 0 || r.Start <= lostFoundIno || r.Start > g.inodes() || r.Len > g.inodes()-r.Start+1 {
				return nil, nil, fmt.Errorf("%w: previous unit %q: inodes %d+%d outside %d to %d", ErrInvalidOptions, n, r.Start, r.Len, lostFoundIno+1, g.inodes())
			}
			is = append(is, owned{blockRange{r.Start, r.Len}, n})
		}
	}
	for _, l := range []*[]owned{&bs, &is} {
		s := *l
		sort.SliceStable(s, func(i, j int) bool { return s[i].start < s[j].start })
		for i := 1; i < len(s); i++ {
			if s[i].start < s[i-1].end() {
				what := "blocks"
				if l == &is {
					what = "inodes"
				}
				return nil, nil, fmt.Errorf("%w: previous units %q and %q share %s at %d", ErrInvalidOptions, s[i-1].unit, s[i].unit, what, s[i].start)
			}
		}
	}
	ri := 0
	for _, b := range bs {
		for ri < len(g.reserved) && g.reserved[ri].end() <= b.start {
			ri++
		}
		if ri < len(g.reserved) && g.reserved[ri].start < b.end() {
			return nil, nil, fmt.Errorf("%w: previous unit %q: blocks %d+%d overlap the metadata at %d", ErrInvalidOptions, b.unit, b.start, b.len, max(b.start, g.reserved[ri].start))
		}
		blocks = append(blocks, b.blockRange)
	}
	for _, i := range is {
		inodes = append(inodes, i.blockRange)
	}
	return mergeAdjacent(blocks), mergeAdjacent(inodes), nil
}

func toRanges(rs []Range) []blockRange {
	out := make([]blockRange, len(rs))
	for i, r := range rs {
		out[i] = blockRange{r.Start, r.Len}
	}
	return out
}

func appendRange(rs []Range, r blockRange) []Range {
	if l := len(rs); l > 0 && rs[l-1].Start+rs[l-1].Len == r.start {
		rs[l-1].Len += r.len
		return rs
	}
	return append(rs, Range{r.start, r.len})
}

// unit returns the state of unit name, creating it.
func (w *Writer) unit(name string) *unitState {
	if u, ok := w.units[name]; ok {
		return u
	}
	u := &unitState{name: name}
	if p, ok := w.opts.Previous[name]; ok {
		u.inodes, u.blocks = toRanges(p.Inodes), toRanges(p.Blocks)
	}
	w.units[name] = u
	w.unitOrder = append(w.unitOrder, name)
	return u
}

// BeginUnit makes the following headers, until the next BeginUnit, part of
// the unit name (see Placements). Beginning a unit again continues it.
func (w *Writer) BeginUnit(name string) error {
	if err := w.nextEntry(); err != nil {
		return err
	}
	w.cu = w.unit(name)
	return nil
}

// Placements returns where each unit's entries went, after Close. Passed
// as Options.Previous, it keeps them there.
func (w *Writer) Placements() map[string]Placement {
	out := make(map[string]Placement, len(w.units))
	for n, u := range w.units {
		out[n] = Placement{
			Inodes: append([]Range(nil), u.rep.Inodes...),
			Blocks: append([]Range(nil), u.rep.Blocks...),
		}
	}
	return out
}

// allocBlocks returns n blocks for the current unit: its previous blocks
// first, then fresh ones.
func (w *Writer) allocBlocks(n uint64) ([]blockRange, error) {
	u := w.cu
	var runs []blockRange
	for n > 0 && len(u.blocks) > 0 {
		r := &u.blocks[0]
		k := min(n, r.len)
		got := blockRange{r.start, k}
		runs = appendRun(runs, got)
		w.alloc.mark(got)
		r.start += k
		r.len -= k
		if r.len == 0 {
			u.blocks = u.blocks[1:]
		}
		n -= k
	}
	if n > 0 {
		more, err := w.alloc.alloc(n)
		if err != nil {
			return nil, err
		}
		for _, r := range more {
			runs = appendRun(runs, r)
		}
	}
	for _, r := range runs {
		u.rep.Blocks = appendRange(u.rep.Blocks, r)
	}
	return runs, nil
}

// newInode returns an inode for the current unit: its next previous inode,
// else the lowest free one that no previous unit holds.
func (w *Writer) newInode() (uint32, *inode, error) {
	u := w.cu
	var ino uint64
	if len(u.inodes) > 0 {
		r := &u.inodes[0]
		ino = r.start
		r.start++
		r.len--
		if r.len == 0 {
			u.inodes = u.inodes[1:]
		}
	} else {
		for {
			for w.inoRI < len(w.inoAvoid) && w.inoAvoid[w.inoRI].end() <= w.inoCursor {
				w.inoRI++
			}
			if w.inoRI < len(w.inoAvoid) && w.inoAvoid[w.inoRI].start <= w.inoCursor {
				w.inoCursor = w.inoAvoid[w.inoRI].end()
				continue
			}
			break
		}
		if w.inoCursor > w.g.inodes() {
			return 0, nil, fmt.Errorf("%w: need 1 more inode, all %d used", ErrNoSpace, w.g.inodes())
		}
		ino = w.inoCursor
		w.inoCursor++
	}
	for uint64(len(w.inodes)) < ino {
		w.inodes = append(w.inodes, inode{})
	}
	w.ninodes++
	u.rep.Inodes = appendRange(u.rep.Inodes, blockRange{ino, 1})
	return uint32(ino), &w.inodes[ino-1], nil
}
