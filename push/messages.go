package push

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/nixvm-image/nixvm-image/store"
)

// hello opens a session.
type hello struct {
	Version     uint64
	Op          uint64
	Name        string
	Digest      [32]byte
	VirtualSize int64
	Link        string
	// Known lists digests of generations whose manifests the sender has
	// cached: the host sends no index for those (version 2).
	Known [][32]byte
}

func (h *hello) encode(e *enc) *enc {
	e.reset().u(h.Version).u(h.Op).str(h.Name).raw(h.Digest[:]).u(uint64(h.VirtualSize)).str(h.Link)
	e.u(uint64(len(h.Known)))
	for _, k := range h.Known {
		e.raw(k[:])
	}
	return e
}

func decodeHello(p []byte) (*hello, error) {
	d := &dec{b: p}
	h := &hello{}
	h.Version = d.u()
	if d.err == nil && h.Version != Version {
		// Everything after the version may differ between versions.
		return h, fmt.Errorf("%w: peer speaks version %d, this nixvm-image speaks version %d; install the same nixvm-image release on both ends", ErrVersion, h.Version, Version)
	}
	h.Op = d.u()
	h.Name = d.str("name", maxName)
	copy(h.Digest[:], d.raw(32))
	h.VirtualSize = int64(d.ub("virtual size", maxVirtualSize))
	h.Link = d.str("link", maxPath)
	nk := d.ub("known generations", maxKnown)
	for i := uint64(0); i < nk && d.err == nil; i++ {
		var k [32]byte
		copy(k[:], d.raw(32))
		h.Known = append(h.Known, k)
	}
	if err := d.done(); err != nil {
		return nil, err
	}
	if h.Op != opPush && h.Op != opList {
		return nil, protoErr("unknown operation %d", h.Op)
	}
	if h.Op == opPush {
		if err := store.ValidName(h.Name); err != nil {
			return nil, err
		}
		if h.VirtualSize <= 0 {
			return nil, protoErr("virtual size %d is not positive", h.VirtualSize)
		}
		if h.Link != "" && !strings.HasPrefix(h.Link, "/") {
			return nil, protoErr("link %q is not an absolute path", h.Link)
		}
	} else if h.Name != "" {
		if err := store.ValidName(h.Name); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// reply answers a hello.
type reply struct {
	Version uint64
	Err     string
	Gens    []store.Generation // for opPush: the named image's generations
	Have    bool               // the host already holds the digest
	Resume  int64              // first block the host still needs
	Index   int                // bytes of each hash prefix in the index frames that follow; 0: no index
}

func (r *reply) encode(e *enc) *enc {
	e.reset().u(r.Version).str(r.Err).u(uint64(len(r.Gens)))
	for _, g := range r.Gens {
		e.str(g.Name).raw(g.Digest[:]).u(uint64(g.VirtualSize)).u(b2u(g.Current)).str(g.Path)
	}
	e.u(b2u(r.Have)).u(uint64(r.Resume)).u(uint64(r.Index))
	return e
}

func decodeReply(p []byte) (*reply, error) {
	d := &dec{b: p}
	r := &reply{}
	r.Version = d.u()
	if d.err == nil && r.Version != Version {
		return nil, fmt.Errorf("%w: host speaks version %d, this nixvm-image speaks version %d; install the same nixvm-image release on both ends", ErrVersion, r.Version, Version)
	}
	r.Err = sanitize(d.str("error", maxMessage))
	n := d.ub("generation count", maxGenerations)
	for i := uint64(0); i < n && d.err == nil; i++ {
		var g store.Generation
		g.Name = Sanitize(d.str("name", maxName), false)
		copy(g.Digest[:], d.raw(32))
		g.VirtualSize = int64(d.ub("virtual size", maxVirtualSize))
		g.Current = d.ub("current", 1) == 1
		g.Path = Sanitize(d.str("path", maxPath), false)
		r.Gens = append(r.Gens, g)
	}
	r.Have = d.ub("have", 1) == 1
	r.Resume = int64(d.ub("resume", maxBlocks))
	r.Index = int(d.ub("index prefix width", 4))
	if d.err == nil && r.Index == 1 {
		d.fail("index prefix width 1")
	}
	return r, d.done()
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// indexEntry says a generation holds a block whose hash starts with Prefix
// (the first 2 to 4 bytes of the hash, little-endian: reply.Index).
type indexEntry struct {
	Block  int64
	Prefix uint32
}

// encodeIndex builds an index frame: the generation, the block numbers as
// runs of consecutive blocks (gap from the previous run's end, length), then
// one width-byte prefix per entry. Entries must ascend strictly. Consecutive
// blocks are the common case, so the block numbers cost a few bytes per run
// and the frame is close to width bytes per entry.
func encodeIndex(e *enc, gen, width int, ents []indexEntry) *enc {
	e.reset().u(uint64(gen))
	var runs []run
	for _, x := range ents {
		if n := len(runs); n > 0 && runs[n-1].Start+runs[n-1].Count == x.Block {
			runs[n-1].Count++
		} else {
			runs = append(runs, run{x.Block, 1})
		}
	}
	e.u(uint64(len(runs)))
	end := int64(0)
	for _, r := range runs {
		e.u(uint64(r.Start - end)).u(uint64(r.Count))
		end = r.Start + r.Count
	}
	var b [4]byte
	for _, x := range ents {
		binary.LittleEndian.PutUint32(b[:], x.Prefix)
		e.raw(b[:width])
	}
	return e
}

// decodeIndex appends the frame's entries to ents; blocks ascend strictly
// and stay below maxBlocks, and a frame holds at most maxIndexEntries.
func decodeIndex(p []byte, ngens, width int, ents []indexEntry) (int, []indexEntry, error) {
	if width < 2 || width > 4 {
		return 0, ents, protoErr("index prefix width %d", width)
	}
	d := &dec{b: p}
	gen := int(d.ub("index generation", uint64(ngens)))
	if d.err == nil && gen < 1 {
		d.fail("index generation 0")
	}
	nruns := d.ub("index runs", maxIndexEntries)
	var runs []run
	end, total := int64(0), int64(0)
	for i := uint64(0); i < nruns && d.err == nil; i++ {
		gap := int64(d.ub("index gap", maxBlocks))
		if i > 0 && gap == 0 {
			d.fail("index runs touch or overlap")
		}
		cnt := int64(d.ub("index run length", maxIndexEntries))
		if d.err == nil && cnt == 0 {
			d.fail("empty index run")
		}
		start := end + gap
		if d.err == nil && start+cnt > maxBlocks {
			d.fail("index run %d+%d out of range", start, cnt)
		}
		total += cnt
		if d.err == nil && total > maxIndexEntries {
			d.fail("index frame has more than %d entries", maxIndexEntries)
		}
		runs = append(runs, run{start, cnt})
		end = start + cnt
	}
	if d.err == nil && int64(len(d.b)) != int64(width)*total {
		d.fail("index prefixes: got %d bytes, want %d", len(d.b), int64(width)*total)
	}
	if d.err != nil {
		return gen, ents, d.err
	}
	for _, r := range runs {
		for b := r.Start; b < r.Start+r.Count; b++ {
			var x [4]byte
			copy(x[:], d.raw(width))
			ents = append(ents, indexEntry{b, binary.LittleEndian.Uint32(x[:])})
		}
	}
	return gen, ents, d.done()
}

// run is a range of blocks.
type run struct{ Start, Count int64 }

// op is one stream frame from the sender.
type op struct {
	Type  byte
	Start int64
	Count int64
	Gen   int      // copy: 0 = the image being written, i = reply.Gens[i-1]
	Src   int64    // copy: first source block
	Sum   [16]byte // copy: hash of the run's block hashes
	Data  []byte   // literal: zstd frame
}

func (o *op) encode(e *enc) *enc {
	e.reset()
	switch o.Type {
	case frameZero:
		e.u(uint64(o.Start)).u(uint64(o.Count))
	case frameCopy:
		e.u(uint64(o.Start)).u(uint64(o.Count)).u(uint64(o.Gen)).u(uint64(o.Src)).raw(o.Sum[:])
	case frameLiteral:
		e.u(uint64(o.Start)).u(uint64(o.Count)).raw(o.Data)
	case frameCheckpoint:
		e.u(uint64(o.Start))
	}
	return e
}

// decodeOp parses a stream frame; ranges are checked against nblocks and
// ngens, ordering is the caller's.
func decodeOp(typ byte, p []byte, nblocks int64, ngens int) (*op, error) {
	d := &dec{b: p}
	o := &op{Type: typ}
	switch typ {
	case frameZero, frameCopy, frameLiteral:
		o.Start = int64(d.ub("start block", uint64(nblocks)))
		max := nblocks - o.Start
		if typ == frameLiteral && max > maxLiteralBlocks {
			max = maxLiteralBlocks
		}
		o.Count = int64(d.ub("block count", uint64(max)))
		if d.err == nil && o.Count == 0 {
			d.fail("empty block run at %d", o.Start)
		}
		switch typ {
		case frameCopy:
			o.Gen = int(d.ub("copy generation", uint64(ngens)))
			o.Src = int64(d.ub("copy source", maxBlocks))
			copy(o.Sum[:], d.raw(16))
		case frameLiteral:
			o.Data = d.rest()
		}
	case frameCheckpoint:
		o.Start = int64(d.ub("checkpoint", uint64(nblocks)))
	case frameEnd:
	default:
		return nil, protoErr("unexpected frame type %d in the block stream", typ)
	}
	return o, d.done()
}

// result ends a pass of the stream.
type result struct {
	Missing []run // blocks to re-send as literals; empty when committed
}

func (r *result) encode(e *enc) *enc {
	e.reset().u(uint64(len(r.Missing)))
	for _, x := range r.Missing {
		e.u(uint64(x.Start)).u(uint64(x.Count))
	}
	return e
}

func decodeResult(p []byte, nblocks int64) (*result, error) {
	d := &dec{b: p}
	n := d.ub("missing ranges", maxRanges)
	r := &result{}
	for i := uint64(0); i < n && d.err == nil; i++ {
		s := int64(d.ub("missing start", uint64(nblocks)))
		c := int64(d.ub("missing count", uint64(nblocks-s)))
		if d.err == nil && c == 0 {
			d.fail("empty missing range")
		}
		r.Missing = append(r.Missing, run{s, c})
	}
	return r, d.done()
}

func decodeError(p []byte) error {
	d := &dec{b: p}
	msg := d.str("error message", maxMessage)
	if err := d.done(); err != nil {
		return err
	}
	return fmt.Errorf("%w: %s", ErrRemote, sanitize(msg))
}

// sanitize keeps a peer's message printable: control characters (C0 but
// newline, DEL, C1 such as the one-byte CSI U+009B) and bidirectional
// overrides become '?', so a host cannot move the cursor, recolour or
// clear the user's terminal, or reorder what it shows.
func sanitize(s string) string { return Sanitize(s, true) }

// Sanitize makes a string from a host safe to print; newline is kept when
// multiline is set.
func Sanitize(s string, multiline bool) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r == '\n' && multiline, r == '\t':
			return r
		case r < 0x20, r >= 0x7f && r < 0xa0, r == utf8.RuneError,
			r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
			return '?'
		}
		return r
	}, s)
}
