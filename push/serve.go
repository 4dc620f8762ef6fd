package push

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/klauspost/compress/zstd"
)

// Serve runs the host half of one session on conn (stdin/stdout of
// `nixvm-image serve`): it answers a list request, or receives a push into
// store. Errors are also sent to the peer when the connection still works.
// A broken connection leaves a checkpoint, so the next push resumes.
func Serve(ctx context.Context, conn io.ReadWriter, store *Store) error {
	fr := newFrameReader(conn)
	fw := newFrameWriter(conn)
	s := &session{store: store, fr: fr, fw: fw}
	err := s.run(ctx)
	if err != nil && !s.peerGone {
		var e enc
		fw.frame(frameError, e.reset().str(truncate(err.Error(), maxMessage)))
		fw.flush()
	}
	return err
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

type session struct {
	store    *Store
	fr       *frameReader
	fw       *frameWriter
	e        enc
	peerGone bool // reading failed: do not try to report
}

func (s *session) read() (byte, []byte, error) {
	typ, p, err := s.fr.next()
	if err != nil {
		if !errors.Is(err, ErrProtocol) {
			s.peerGone = true
		}
		return 0, nil, err
	}
	if typ == frameError {
		s.peerGone = true
		return 0, nil, decodeError(p)
	}
	return typ, p, nil
}

func (s *session) run(ctx context.Context) error {
	if err := s.fr.readMagic(); err != nil {
		if !errors.Is(err, ErrProtocol) {
			s.peerGone = true
		}
		return err
	}
	if err := s.fw.writeMagic(); err != nil {
		return err
	}
	typ, p, err := s.read()
	if err != nil {
		return err
	}
	if typ != frameHello {
		return protoErr("first frame has type %d, want hello (%d)", typ, frameHello)
	}
	h, err := decodeHello(p)
	if err != nil {
		if errors.Is(err, ErrVersion) {
			// Answer in our version so the peer can name both.
			s.fw.frame(frameReply, (&reply{Version: Version, Err: err.Error()}).encode(&s.e))
			s.fw.flush()
			s.peerGone = true
		}
		return err
	}
	if h.Op == opList {
		return s.list(h)
	}
	return s.push(ctx, h)
}

func (s *session) list(h *hello) error {
	names := []string{h.Name}
	if h.Name == "" {
		var err error
		if names, err = s.store.Names(); err != nil {
			return err
		}
	}
	r := &reply{Version: Version}
	for _, n := range names {
		gens, err := s.store.List(n)
		if err != nil {
			return err
		}
		r.Gens = append(r.Gens, gens...)
	}
	if len(r.Gens) > maxGenerations {
		r.Gens = r.Gens[:maxGenerations]
	}
	s.fw.frame(frameReply, r.encode(&s.e))
	return s.fw.flush()
}

func (s *session) push(ctx context.Context, h *hello) error {
	unlock, err := s.store.lock(h.Name)
	if err != nil {
		return err
	}
	defer unlock()
	gens, err := s.store.List(h.Name)
	if err != nil {
		return err
	}
	if len(gens) > maxGenerations-1 {
		gens = gens[:maxGenerations-1]
	}
	r := &reply{Version: Version, Gens: gens}
	for _, g := range gens {
		if g.Digest == h.Digest && g.VirtualSize == h.VirtualSize { // the digest does not cover the size
			r.Have = true
		}
	}
	if r.Have {
		if err := s.store.activate(h.Name, h.Digest, h.Link); err != nil {
			return err
		}
		s.fw.frame(frameReply, r.encode(&s.e))
		return s.fw.flush()
	}
	p, err := s.store.openPartial(h.Name, h.Digest, h.VirtualSize)
	if err != nil {
		return err
	}
	defer p.close()
	r.Resume = p.next
	// Every generation's block hashes, for checking copies. The sender has
	// the manifests of the generations it listed as known: it gets no index
	// for those, and none for their blocks in other generations.
	known := map[[32]byte]bool{}
	for _, k := range h.Known {
		known[k] = true
	}
	idx := make([][]Hash, len(gens)+1)
	seen := map[Hash]bool{ZeroHash: true}
	var unknown []int
	for gi, g := range gens {
		blocks, err := s.store.loadIndex(g)
		if err != nil {
			blocks = nil // unusable: never offered, every copy from it fails
		}
		idx[gi+1] = blocks
		if !known[g.Digest] {
			unknown = append(unknown, gi)
			continue
		}
		for _, hh := range blocks {
			seen[hh] = true
		}
	}
	// An index of the other generations: each distinct block once.
	ents := make([][]indexEntry, len(gens)+1)
	total := 0
	for _, gi := range unknown {
		for b, hh := range idx[gi+1] {
			if !seen[hh] {
				seen[hh] = true
				ents[gi+1] = append(ents[gi+1], indexEntry{Block: int64(b)})
			}
		}
		total += len(ents[gi+1])
	}
	if total > 0 {
		r.Index = indexWidth(total)
	}
	if err := s.fw.frame(frameReply, r.encode(&s.e)); err != nil {
		return err
	}
	for gi, es := range ents {
		for i := range es {
			es[i].Prefix = prefixOf(idx[gi][es[i].Block], r.Index)
		}
		for len(es) > 0 {
			n := min(len(es), 1<<16)
			s.fw.frame(frameIndex, encodeIndex(&s.e, gi, r.Index, es[:n]))
			es = es[n:]
		}
	}
	if r.Index > 0 {
		s.fw.frame(frameIndexEnd, s.e.reset())
	}
	if err := s.fw.flush(); err != nil {
		return err
	}
	rc := &receiver{s: s, h: h, p: p, idx: idx, gens: gens, readers: map[int]*genReader{}}
	defer rc.closeReaders()
	err = rc.stream(ctx)
	if err != nil && s.peerGone {
		// The connection broke: keep what arrived for the next push.
		if cerr := p.checkpoint(); cerr != nil {
			err = fmt.Errorf("%w (and saving the resume point failed: %v)", err, cerr)
		}
	}
	return err
}

// indexWidth is the bytes of hash prefix an index of n blocks sends: 3
// while a block the host lacks matches some prefix by chance less than one
// time in eight (n <= 2^21), else 4. A chance match costs the sender one
// copy frame the host refuses and the block as a literal again; two blocks
// of the host sharing a prefix cost at most that at the start of a run.
func indexWidth(n int) int {
	if n <= 1<<21 {
		return 3
	}
	return 4
}

type receiver struct {
	s       *session
	h       *hello
	p       *partial
	idx     [][]Hash // [gen] block hashes; idx[0] unused (self = p.hashes)
	gens    []Generation
	readers map[int]*genReader
	dec     *zstd.Decoder
	buf     []byte
	sinceCk int64
}

func (rc *receiver) closeReaders() {
	for _, r := range rc.readers {
		r.Close()
	}
	if rc.dec != nil {
		rc.dec.Close()
	}
}

func (rc *receiver) stream(ctx context.Context) error {
	p := rc.p
	fixup := false
	var err error
	rc.dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxLiteralBlocks*BlockSize+(1<<20)), zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		return err
	}
	rc.buf = make([]byte, maxLiteralBlocks*BlockSize)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		typ, payload, err := rc.s.read()
		if err != nil {
			return err
		}
		o, err := decodeOp(typ, payload, p.n, len(rc.gens))
		if err != nil {
			return err
		}
		if o.Type != frameEnd && o.Type != frameCheckpoint {
			if fixup && o.Type != frameLiteral {
				return protoErr("frame type %d while re-sending missing blocks", o.Type)
			}
			if !fixup && o.Start != p.next {
				return protoErr("blocks out of order: got run at %d, want %d", o.Start, p.next)
			}
		}
		switch o.Type {
		case frameZero:
			for i := o.Start; i < o.Start+o.Count; i++ {
				p.hashes[i] = ZeroHash
			}
			p.next += o.Count
		case frameCopy:
			if err := rc.copyRun(o); err != nil {
				return err
			}
			p.next += o.Count
		case frameLiteral:
			if fixup {
				for i := o.Start; i < o.Start+o.Count; i++ {
					if !p.missing[i] {
						return protoErr("re-sent block %d was not missing", i)
					}
				}
			}
			if err := rc.literal(o); err != nil {
				return err
			}
			if fixup {
				for i := o.Start; i < o.Start+o.Count; i++ {
					delete(p.missing, i)
					p.fixed = append(p.fixed, i)
				}
			} else {
				p.next += o.Count
			}
		case frameCheckpoint:
			if o.Start != p.next {
				return protoErr("checkpoint at %d, but %d blocks arrived", o.Start, p.next)
			}
			if err := p.checkpoint(); err != nil {
				return fmt.Errorf("push: saving progress in %s: %w", p.dir, err)
			}
		case frameEnd:
			if p.next != p.n {
				return protoErr("end of stream after %d blocks, want %d", p.next, p.n)
			}
			if len(p.missing) > 0 {
				if err := p.checkpoint(); err != nil {
					return fmt.Errorf("push: saving progress in %s: %w", p.dir, err)
				}
				fixup = true
				res := &result{Missing: runsOf(p.missing)}
				if len(res.Missing) > maxRanges {
					res.Missing = res.Missing[:maxRanges]
				}
				rc.s.fw.frame(frameResult, res.encode(&rc.s.e))
				if err := rc.s.fw.flush(); err != nil {
					return err
				}
				continue
			}
			if got := Digest(p.hashes); got != rc.h.Digest {
				p.discard()
				return fmt.Errorf("%w: the received image has digest %x, the sender announced %x (a stale IMAGE.manifest beside the image? delete it); push again", ErrDigest, got, rc.h.Digest)
			}
			if err := rc.s.store.commit(rc.h.Name, p); err != nil {
				return fmt.Errorf("push: storing generation %x of %q: %w", rc.h.Digest[:8], rc.h.Name, err)
			}
			if err := rc.s.store.activate(rc.h.Name, rc.h.Digest, rc.h.Link); err != nil {
				return err
			}
			rc.s.fw.frame(frameResult, (&result{}).encode(&rc.s.e))
			return rc.s.fw.flush()
		}
	}
}

func runsOf(set map[int64]bool) []run {
	var bs []int64
	for b := range set {
		bs = append(bs, b)
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i] < bs[j] })
	var rs []run
	for _, b := range bs {
		if n := len(rs); n > 0 && rs[n-1].Start+rs[n-1].Count == b {
			rs[n-1].Count++
		} else {
			rs = append(rs, run{b, 1})
		}
	}
	return rs
}

func (rc *receiver) literal(o *op) error {
	want := int(o.Count) * BlockSize
	out, err := rc.dec.DecodeAll(o.Data, rc.buf[:0])
	if err != nil {
		return protoErr("literal at block %d: %v", o.Start, err)
	}
	if len(out) != want {
		return protoErr("literal at block %d: got %d bytes, want %d", o.Start, len(out), want)
	}
	for i := int64(0); i < o.Count; i++ {
		rc.p.hashes[o.Start+i] = hashBlock(out[i*BlockSize : (i+1)*BlockSize])
	}
	if err := rc.p.writeBlocks(o.Start, out); err != nil {
		return fmt.Errorf("push: writing the received image: %w", err)
	}
	return nil
}

// copyRun copies blocks the host already holds, checking each source block
// against its recorded hash and the run against the sender's sum. Blocks
// that fail are recorded as missing and asked for again at the end.
func (rc *receiver) copyRun(o *op) error {
	p := rc.p
	var src []Hash
	var read func(start int64, buf []byte) error
	if o.Gen == 0 {
		if o.Src+o.Count > o.Start {
			return protoErr("copy of blocks %d+%d from the image itself reaches block %d being written", o.Src, o.Count, o.Start)
		}
		src = p.hashes
		read = p.readBlocks
	} else {
		src = rc.idx[o.Gen]
		if o.Src+o.Count > int64(len(src)) {
			return protoErr("copy of blocks %d+%d from generation %d of %d blocks", o.Src, o.Count, o.Gen, len(src))
		}
		r := rc.readers[o.Gen]
		if r == nil {
			var err error
			if r, err = openGen(rc.gens[o.Gen-1].Path); err != nil {
				return err
			}
			rc.readers[o.Gen] = r
		}
		read = r.readBlocks
	}
	if src == nil || o.Src+o.Count > int64(len(src)) {
		for i := o.Start; i < o.Start+o.Count; i++ {
			p.missing[i] = true
		}
		return nil
	}
	expect := src[o.Src : o.Src+o.Count]
	if runSum(expect) != o.Sum {
		// The sender matched a hash prefix that is not the block it wants.
		for i := o.Start; i < o.Start+o.Count; i++ {
			p.missing[i] = true
		}
		return nil
	}
	for done := int64(0); done < o.Count; {
		n := min(o.Count-done, maxLiteralBlocks)
		buf := rc.buf[:n*BlockSize]
		if err := read(o.Src+done, buf); err != nil {
			return fmt.Errorf("push: reading a stored generation: %w", err)
		}
		// Write runs of good non-zero blocks with one call each.
		first := int64(-1)
		write := func(end int64) error {
			if first < 0 {
				return nil
			}
			err := p.writeBlocks(o.Start+done+first, buf[first*BlockSize:end*BlockSize])
			first = -1
			if err != nil {
				return fmt.Errorf("push: writing the received image: %w", err)
			}
			return nil
		}
		for i := int64(0); i < n; i++ {
			dst := o.Start + done + i
			want := expect[done+i]
			good := hashBlock(buf[i*BlockSize:(i+1)*BlockSize]) == want
			if good {
				p.hashes[dst] = want
			} else {
				p.missing[dst] = true
			}
			if !good || want == ZeroHash {
				if err := write(i); err != nil {
					return err
				}
				continue
			}
			if first < 0 {
				first = i
			}
		}
		if err := write(n); err != nil {
			return err
		}
		done += n
	}
	return nil
}
