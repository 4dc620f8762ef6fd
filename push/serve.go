package push

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// Serve runs the host half of one session on conn (stdin/stdout of
// `nixvm-image serve`): it answers a list request, or receives a push into
// st. Errors are also sent to the peer when the connection still works.
// A broken connection leaves a checkpoint, so the next push resumes.
func Serve(ctx context.Context, conn io.ReadWriter, st *store.Store) error {
	return ServeIdle(ctx, conn, st, DefaultIdleTimeout)
}

// ServeIdle is Serve with an idle timeout: when the peer sends no frame,
// or reads nothing, for that long, the session ends with ErrIdle as if the
// connection broke (lock released, checkpoint kept for a resume).
func ServeIdle(ctx context.Context, conn io.ReadWriter, st *store.Store, idle time.Duration) error {
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	ic := newIdleConn(conn, idle)
	fr := newFrameReader(ic)
	fw := newFrameWriter(ic)
	s := &session{store: st, fr: fr, fw: fw, conn: ic}
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
	store    *store.Store
	fr       *frameReader
	fw       *frameWriter
	e        enc
	peerGone bool // reading failed: do not try to report
	conn     *idleConn
}

func (s *session) read() (byte, []byte, error) {
	typ, p, err := s.fr.next()
	if err != nil {
		if !errors.Is(err, ErrProtocol) {
			s.peerGone = true
		}
		return 0, nil, err
	}
	s.conn.touch()
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

// push receives the image h announces under its name's lock.
func (s *session) push(ctx context.Context, h *hello) (err error) {
	l, err := s.store.Lock(h.Name)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, l.Unlock()) }()
	gens, err := s.store.List(h.Name)
	if err != nil {
		return err
	}
	r := &reply{Version: Version}
	for _, g := range gens {
		if g.Digest == h.Digest && g.VirtualSize == h.VirtualSize { // the digest does not cover the size
			r.Have = true
		}
	}
	if len(gens) > maxGenerations-1 {
		gens = gens[:maxGenerations-1]
	}
	r.Gens = gens
	if r.Have {
		if err := l.Activate(h.Digest, h.Link); err != nil {
			return err
		}
		s.fw.frame(frameReply, r.encode(&s.e))
		return s.fw.flush()
	}
	p, err := l.OpenPartial(h.Digest, h.VirtualSize)
	if err != nil {
		return err
	}
	defer p.Close()
	r.Resume = p.Next
	idx := s.offer(r, h.Known)
	if err := s.fw.flush(); err != nil {
		return err
	}
	rc := &receiver{s: s, h: h, l: l, p: p, idx: idx, gens: gens, readers: map[int]*store.Reader{}}
	defer rc.closeReaders()
	err = rc.stream(ctx)
	if errors.Is(err, ErrIdle) {
		s.peerGone = true // a stalled peer: report nothing, keep what arrived
	}
	if err != nil && s.peerGone {
		// The connection broke: keep what arrived for the next push.
		if cerr := p.Checkpoint(); cerr != nil {
			err = fmt.Errorf("%w (and saving the resume point failed: %v)", err, cerr)
		}
	}
	return err
}

// offer sends reply r and, for the generations the sender does not know,
// an index of the blocks it cannot know otherwise. It returns every
// generation's block hashes, for checking copies: [gen], idx[0] unused.
func (s *session) offer(r *reply, knownDigests [][32]byte) [][]manifest.Hash {
	known := map[[32]byte]bool{}
	for _, k := range knownDigests {
		known[k] = true
	}
	idx := make([][]manifest.Hash, len(r.Gens)+1)
	seen := map[manifest.Hash]bool{manifest.ZeroHash(): true}
	var unknown []int
	for gi, g := range r.Gens {
		m, err := s.store.Manifest(g)
		if err == nil { // else unusable: never offered, every copy from it fails
			idx[gi+1] = m.Blocks
		}
		if !known[g.Digest] {
			unknown = append(unknown, gi+1)
			continue
		}
		for _, hh := range idx[gi+1] {
			seen[hh] = true
		}
	}
	ents, total := newBlocks(idx, unknown, seen)
	if total > 0 {
		r.Index = indexWidth(total)
	}
	if s.fw.frame(frameReply, r.encode(&s.e)) == nil {
		s.sendIndex(r.Index, idx, ents)
	}
	return idx
}

// newBlocks lists, for the unknown generations, each block whose hash is
// not in seen, each distinct hash once.
func newBlocks(idx [][]manifest.Hash, unknown []int, seen map[manifest.Hash]bool) ([][]indexEntry, int) {
	ents := make([][]indexEntry, len(idx))
	total := 0
	for _, gi := range unknown {
		for b, hh := range idx[gi] {
			if !seen[hh] {
				seen[hh] = true
				ents[gi] = append(ents[gi], indexEntry{Block: int64(b)})
			}
		}
		total += len(ents[gi])
	}
	return ents, total
}

// sendIndex writes the index frames (errors are sticky in the frame writer).
func (s *session) sendIndex(width int, idx [][]manifest.Hash, ents [][]indexEntry) {
	for gi, es := range ents {
		for i := range es {
			es[i].Prefix = prefixOf(idx[gi][es[i].Block], width)
		}
		for len(es) > 0 {
			n := min(len(es), 1<<16)
			s.fw.frame(frameIndex, encodeIndex(&s.e, gi, width, es[:n]))
			es = es[n:]
		}
	}
	if width > 0 {
		s.fw.frame(frameIndexEnd, s.e.reset())
	}
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
