package push

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
)

// loc is where the host holds a block.
type loc struct {
	gen   int
	block int64
}

// hostBlocks is what the sender knows of the blocks the host holds: every
// block hash of the generations whose manifests it has cached (the host
// sent no index for them), and 3- or 4-byte prefixes of the others' blocks
// from the index.
type hostBlocks struct {
	full  [][]manifest.Hash  // [gen]: every block hash, from a cached manifest
	at    []map[int64]uint32 // [gen]: block -> hash prefix, from the index
	exact map[manifest.Hash]loc
	where map[uint32]loc // prefix -> first location in an indexed generation
	width int            // bytes of the index's prefixes

	// claimed is how many index entries the host may send: the blocks of
	// the generations it indexes, by the sizes it gave. keep is how many
	// the sender keeps (the rest are read and dropped): what the image
	// being pushed can use, so a host cannot grow the sender's memory
	// beyond a multiple of the image's size.
	claimed, keep, kept int64
}

// indexKeepFactor times the pushed image's blocks is how many index
// entries the sender keeps.
const indexKeepFactor = 4

// knownHostBlocks takes the full block lists of the host's generations
// that h listed as known from the cache.
func knownHostBlocks(r *reply, h *hello, cache *Cache, st *Stats) *hostBlocks {
	k := &hostBlocks{
		full:  make([][]manifest.Hash, len(r.Gens)+1),
		at:    make([]map[int64]uint32, len(r.Gens)+1),
		exact: map[manifest.Hash]loc{},
		where: map[uint32]loc{},
		width: r.Index,
	}
	known := map[[32]byte]bool{}
	for _, d := range h.Known {
		known[d] = true
	}
	zero := manifest.ZeroHash()
	for gi, g := range r.Gens {
		if !known[g.Digest] {
			k.claimed += manifest.BlockCount(g.VirtualSize)
			continue
		}
		m, err := cache.Load(g.Digest)
		if err != nil || m.VirtualSize != g.VirtualSize {
			continue // the host sent no index for it: its blocks are not offered
		}
		st.CachedGens++
		k.full[gi+1] = m.Blocks
		for b, hh := range m.Blocks {
			if _, ok := k.exact[hh]; !ok && hh != zero {
				k.exact[hh] = loc{gi + 1, int64(b)}
			}
		}
	}
	return k
}

// readIndex reads the index frames that follow reply r, if any.
func (k *hostBlocks) readIndex(fr *frameReader, r *reply, srcBlocks int64, st *Stats) error {
	if r.Index == 0 {
		return nil
	}
	k.keep = indexKeepFactor*srcBlocks + 1<<12
	var ents []indexEntry
	for {
		typ, p, err := fr.next()
		if err != nil {
			return noEOF(err)
		}
		switch typ {
		case frameError:
			return decodeError(p)
		case frameIndexEnd:
			return nil
		case frameIndex:
		default:
			return protoErr("got frame type %d in the index, want %d", typ, frameIndex)
		}
		var gen int
		if gen, ents, err = decodeIndex(p, len(r.Gens), r.Index, ents[:0]); err != nil {
			return err
		}
		if err := k.addIndex(gen, ents, r, st); err != nil {
			return err
		}
	}
}

// addIndex records one index frame's entries of generation gen.
func (k *hostBlocks) addIndex(gen int, ents []indexEntry, r *reply, st *Stats) error {
	if k.full[gen] != nil {
		return protoErr("index of generation %d, which the sender knows", gen)
	}
	if k.at[gen] == nil {
		k.at[gen] = map[int64]uint32{}
		st.IndexedGens++
	}
	st.IndexEntries += int64(len(ents))
	if st.IndexEntries > k.claimed {
		return protoErr("index of %d entries or more, but the generations it covers have %d blocks", st.IndexEntries, k.claimed)
	}
	for _, x := range ents {
		if x.Block >= manifest.BlockCount(r.Gens[gen-1].VirtualSize) {
			return protoErr("index block %d beyond generation %d", x.Block, gen)
		}
		if k.kept >= k.keep {
			continue
		}
		if _, ok := k.at[gen][x.Block]; !ok {
			k.kept++
		}
		k.at[gen][x.Block] = x.Prefix
		if _, ok := k.where[x.Prefix]; !ok {
			k.where[x.Prefix] = loc{gen, x.Block}
		}
	}
	return nil
}

// has reports whether block b of generation gen (>= 1) probably holds h.
func (k *hostBlocks) has(gen int, b int64, h manifest.Hash) bool {
	if f := k.full[gen]; f != nil {
		return b < int64(len(f)) && f[b] == h
	}
	pf, ok := k.at[gen][b]
	return ok && pf == prefixOf(h, k.width)
}

// prefixOf is the first width (1 to 4) bytes of h, little-endian.
func prefixOf(h manifest.Hash, width int) uint32 {
	return binary.LittleEndian.Uint32(h[:4]) & uint32(uint64(1)<<(8*width)-1)
}

// runSum is the sum a copy frame carries: the first 16 bytes of the digest
// of the run's block hashes.
func runSum(blocks []manifest.Hash) [16]byte {
	d := manifest.ComputeDigest(blocks)
	var s [16]byte
	copy(s[:], d[:])
	return s
}

type sender struct {
	ctx     context.Context
	src     *Source
	opts    Options
	fw      *frameWriter
	st      *Stats
	replies chan frameOrErr
	host    *hostBlocks
	self    map[manifest.Hash]int64 // first block of the image with each hash
	enc     *zstd.Encoder
	e       enc
	buf     []byte
	zbuf    []byte

	cur     pend  // the run being built
	sinceCk int64 // bytes of the image since the last checkpoint
}

func newSender(ctx context.Context, src *Source, opts Options, fw *frameWriter, st *Stats, replies chan frameOrErr, k *hostBlocks) (*sender, error) {
	s := &sender{ctx: ctx, src: src, opts: opts, fw: fw, st: st, replies: replies, host: k, self: map[manifest.Hash]int64{}}
	level := s.opts.Level
	if level == 0 {
		level = zstd.SpeedDefault
	}
	var err error
	s.enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
	s.buf = make([]byte, maxLiteralBlocks*manifest.BlockSize)
	return s, err
}

// run streams the image from block resume, ends the stream and re-sends
// what the host found missing until it has everything.
func (s *sender) run(resume int64) error {
	for i := int64(0); i < resume; i++ {
		if _, ok := s.self[s.src.Blocks[i]]; !ok {
			s.self[s.src.Blocks[i]] = i
		}
	}
	if err := s.stream(resume); err != nil {
		return s.explain(err)
	}
	for round := 0; ; round++ {
		missing, err := s.end()
		if err != nil || len(missing) == 0 {
			return err
		}
		if round == 2 {
			return fmt.Errorf("push: the host still lacks %d block ranges after re-sending them twice", len(missing))
		}
		if err := s.resend(missing); err != nil {
			return s.explain(err)
		}
	}
}

// end sends End and returns the ranges the host still lacks.
func (s *sender) end() ([]run, error) {
	s.fw.frame(frameEnd, s.e.reset())
	if err := s.fw.flush(); err != nil {
		return nil, s.explain(err)
	}
	f := <-s.replies
	if f.err != nil {
		return nil, fmt.Errorf("push: waiting for the host's result: %w", noEOF(f.err))
	}
	switch f.typ {
	case frameError:
		return nil, decodeError(f.p)
	case frameResult:
	default:
		return nil, protoErr("got frame type %d, want a result", f.typ)
	}
	res, err := decodeResult(f.p, int64(len(s.src.Blocks)))
	if err != nil {
		return nil, err
	}
	return res.Missing, nil
}

// resend sends the missing ranges as literals.
func (s *sender) resend(missing []run) error {
	for _, m := range missing {
		for b := m.Start; b < m.Start+m.Count; b += maxLiteralBlocks {
			c := min(maxLiteralBlocks, m.Start+m.Count-b)
			if err := s.literal(b, c); err != nil {
				return err
			}
			s.st.ResentBlocks += c
		}
	}
	return nil
}

// explain replaces a write error by the host's own error when it sent one.
func (s *sender) explain(err error) error {
	select {
	case f := <-s.replies:
		if f.typ == frameError && f.err == nil {
			return decodeError(f.p)
		}
	default:
	}
	return err
}

// hostError returns the host's error if it has sent one.
func (s *sender) hostError() error {
	select {
	case f := <-s.replies:
		if f.err != nil {
			return fmt.Errorf("push: connection to the host broke: %w", noEOF(f.err))
		}
		if f.typ == frameError {
			return decodeError(f.p)
		}
		return protoErr("host sent frame type %d during the stream", f.typ)
	default:
		return nil
	}
}

// pend is a run of blocks being built.
type pend struct {
	typ   byte
	start int64
	count int64
	gen   int
	src   int64
}

// stream sends blocks [from, n) as runs of zero, copy and literal frames.
func (s *sender) stream(from int64) error {
	blocks := s.src.Blocks
	for i := from; i < int64(len(blocks)); i++ {
		if i&1023 == 0 {
			if err := s.ctx.Err(); err != nil {
				return err
			}
			if err := s.hostError(); err != nil {
				return err
			}
		}
		if s.extend(i) {
			continue
		}
		next := s.runFor(i)
		if err := s.flush(); err != nil {
			return err
		}
		next.start, next.count = i, 1
		s.cur = next
	}
	return s.flush()
}

// extend adds block i to the current run if it continues it.
func (s *sender) extend(i int64) bool {
	c := &s.cur
	if c.count == 0 {
		return false
	}
	h := s.src.Blocks[i]
	switch c.typ {
	case frameZero:
		if h != manifest.ZeroHash() {
			return false
		}
	case frameCopy:
		if h == manifest.ZeroHash() || !s.continues(*c, h) {
			return false
		}
	case frameLiteral:
		if c.count == maxLiteralBlocks || h == manifest.ZeroHash() || s.wouldCopy(h, i) {
			return false
		}
		s.remember(h, i)
	}
	c.count++
	return true
}

// runFor decides which kind of run block i starts.
func (s *sender) runFor(i int64) pend {
	h := s.src.Blocks[i]
	if h == manifest.ZeroHash() {
		return pend{typ: frameZero}
	}
	defer s.remember(h, i)
	if l, ok := s.host.exact[h]; ok {
		return pend{typ: frameCopy, gen: l.gen, src: l.block}
	}
	if l, ok := s.host.where[prefixOf(h, s.host.width)]; ok {
		return pend{typ: frameCopy, gen: l.gen, src: l.block}
	}
	if j, ok := s.self[h]; ok && j < i {
		return pend{typ: frameCopy, gen: 0, src: j}
	}
	return pend{typ: frameLiteral}
}

// wouldCopy reports whether runFor would start a copy run at block i.
func (s *sender) wouldCopy(h manifest.Hash, i int64) bool {
	if _, ok := s.host.exact[h]; ok {
		return true
	}
	if _, ok := s.host.where[prefixOf(h, s.host.width)]; ok {
		return true
	}
	j, ok := s.self[h]
	return ok && j < i
}

// remember notes the first block of the image with hash h.
func (s *sender) remember(h manifest.Hash, i int64) {
	if _, ok := s.self[h]; !ok {
		s.self[h] = i
	}
}

// continues reports whether block hash h extends copy run c by one block.
func (s *sender) continues(c pend, h manifest.Hash) bool {
	nb := c.src + c.count
	if c.gen == 0 {
		return nb < c.start && s.src.Blocks[nb] == h
	}
	return s.host.has(c.gen, nb, h)
}

// flush sends the current run, and a checkpoint when one is due.
func (s *sender) flush() error {
	c := s.cur
	if c.count == 0 {
		return nil
	}
	s.cur = pend{}
	var err error
	switch c.typ {
	case frameZero:
		s.st.ZeroBlocks += c.count
		err = s.fw.frame(frameZero, (&op{Type: frameZero, Start: c.start, Count: c.count}).encode(&s.e))
	case frameCopy:
		s.st.CopiedBlocks += c.count
		o := &op{Type: frameCopy, Start: c.start, Count: c.count, Gen: c.gen, Src: c.src, Sum: runSum(s.src.Blocks[c.start : c.start+c.count])}
		err = s.fw.frame(frameCopy, o.encode(&s.e))
	case frameLiteral:
		s.st.LiteralBlocks += c.count
		err = s.literal(c.start, c.count)
	}
	if s.opts.Progress != nil {
		s.opts.Progress(min(c.count*manifest.BlockSize, s.src.VirtualSize-c.start*manifest.BlockSize))
	}
	s.sinceCk += c.count * manifest.BlockSize
	if err != nil || s.sinceCk < s.opts.CheckpointBytes {
		return err
	}
	s.sinceCk = 0
	return s.fw.frame(frameCheckpoint, (&op{Type: frameCheckpoint, Start: c.start + c.count}).encode(&s.e))
}

// literal sends blocks [start, start+count) as one zstd frame.
func (s *sender) literal(start, count int64) error {
	buf := s.buf[:count*manifest.BlockSize]
	off := start * manifest.BlockSize
	n := min(int64(len(buf)), s.src.VirtualSize-off)
	if k, err := s.src.R.ReadAt(buf[:n], off); k < int(n) {
		return fmt.Errorf("push: reading the image at %d: %w", off, noEOF(err))
	}
	clear(buf[n:])
	s.zbuf = s.enc.EncodeAll(buf, s.zbuf[:0])
	return s.fw.frame(frameLiteral, (&op{Type: frameLiteral, Start: start, Count: count, Data: s.zbuf}).encode(&s.e))
}
