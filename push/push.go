// Package push sends a disk image to a host's image store, moving only the
// 4 KiB blocks the host does not already hold, and runs the host half
// (Serve) behind `nixvm-image serve`.
//
// Identity is the guest-visible content: BLAKE3-128 of each 4 KiB block of
// the virtual disk, matched at any offset of any generation the host holds;
// an image's digest is BLAKE3 over its block hashes. A session is one
// exchange (the host's generations, a resume point, and an index of 3-byte
// hash prefixes of the blocks the sender does not know yet) and then one
// pipelined stream of zero runs, copy runs and zstd literals, with checkpoints the
// host makes durable so a broken connection resumes where it stopped. The
// host checks every copied block against its own index as it copies (a
// failed block is asked for again as a literal), recomputes the digest of
// what it wrote, and only then stores the generation and swaps `current`.
//
// The sender keeps the manifests of images it pushed in a Cache and lists
// their digests in its hello; for the host's generations among them the
// host sends no index at all, so pushing a rebuild of an image pushed from
// the same machine costs a reply of a few hundred bytes. Without the cache
// the index costs 3 bytes per distinct non-zero block the host holds (4
// beyond 2^21 blocks).
// Both are hints: a stale entry or a prefix collision makes a copy fail the
// host's check, and the host asks for those blocks again as literals.
//
// Limits: virtual sizes up to 1 TiB; the host keeps 16 bytes per block of
// the image being received in memory (4 MiB per GiB), the sender about 40
// bytes per indexed or cached block of the host's generations.
package push

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// Source is an image to push: its guest-visible content and block hashes.
type Source struct {
	R           io.ReaderAt
	VirtualSize int64
	Blocks      []Hash
	Digest      [32]byte
	// FromManifest says the hashes came from IMAGE.manifest, not from
	// reading the image.
	FromManifest bool
	close        func() error
}

// Close releases the image file.
func (s *Source) Close() error {
	if s.close != nil {
		return s.close()
	}
	return nil
}

// OpenSource opens a qcow2 (or raw) image. Its block hashes come from the
// manifest the builder wrote beside it (path + ".manifest") when that
// exists and has the image's virtual size, else from hashing the image.
// progress, if not nil, receives bytes hashed.
func OpenSource(path string, progress func(int64)) (*Source, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("push: %s: %w", path, err)
	}
	if err := img.Readable(); err != nil {
		img.Close()
		f.Close()
		return nil, fmt.Errorf("push: %s: %w", path, err)
	}
	var src *Source
	if m, merr := readManifestFile(path + ".manifest"); merr == nil && m.VirtualSize == img.Size() {
		// The builder's manifest: no need to hash the image again.
		src = &Source{R: img, VirtualSize: m.VirtualSize, Blocks: m.Blocks, Digest: m.Digest, FromManifest: true}
		if progress != nil {
			progress(m.VirtualSize)
		}
	} else if merr != nil && !errors.Is(merr, os.ErrNotExist) {
		img.Close()
		f.Close()
		return nil, fmt.Errorf("push: %s.manifest: %w (delete it to hash the image instead)", path, merr)
	} else {
		src, err = NewSource(img, img.Size(), progress)
	}
	if err != nil {
		img.Close()
		f.Close()
		return nil, fmt.Errorf("push: %s: %w", path, err)
	}
	src.close = func() error { img.Close(); return f.Close() }
	return src, nil
}

// NewSource hashes the virtual disk r of the given size.
func NewSource(r io.ReaderAt, size int64, progress func(int64)) (*Source, error) {
	blocks, err := HashImage(r, size, progress)
	if err != nil {
		return nil, err
	}
	return &Source{R: r, VirtualSize: size, Blocks: blocks, Digest: Digest(blocks)}, nil
}

var _ image.Image // go-qcow2reader's image type backs Source.R

// Options configure a push. The zero value is the default.
type Options struct {
	// Name of the image on the host (one path element), required.
	Name string
	// Link, if set, is a path on the host made a symlink to the new
	// generation, e.g. /etc/virt/base-images/baseline.qcow2.
	Link string
	// CheckpointBytes is how much of the image goes by between checkpoints;
	// 0 means 64 MiB.
	CheckpointBytes int64
	// Level is the zstd level of literal data; 0 means zstd's default.
	Level zstd.EncoderLevel
	// Progress, if not nil, receives bytes of the image dealt with.
	Progress func(n int64)
	// Cache, if not nil, holds manifests of generations hosts may hold:
	// for those the host sends no index. Push does not add to it.
	Cache *Cache
}

// Stats describe one push.
type Stats struct {
	Sent, Received int64 // bytes on the wire
	ImageSize      int64 // virtual size
	AlreadyCurrent bool  // the host held the digest; nothing streamed
	ResumedAt      int64 // block the stream started at
	ZeroBlocks     int64
	CopiedBlocks   int64
	LiteralBlocks  int64
	ResentBlocks   int64 // re-sent after the host found a copy bad
	CachedGens     int   // host generations known from the manifest cache
	IndexedGens    int   // host generations the host sent an index of
	IndexEntries   int64 // entries in that index
	Digest         [32]byte
}

// ErrNoServer reports a peer that closed the connection without answering:
// usually nixvm-image is not installed on the host.
var ErrNoServer = errors.New("push: the host did not answer")

type countingRW struct {
	r   io.Reader
	w   io.Writer
	in  atomic.Int64
	out atomic.Int64
}

func (c *countingRW) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.in.Add(int64(n))
	return n, err
}

func (c *countingRW) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.out.Add(int64(n))
	return n, err
}

// loc is where the host holds a block.
type loc struct {
	gen   int
	block int64
}

// Push sends src to the host at the other end of conn and returns once the
// host has verified and activated it.
func Push(ctx context.Context, conn io.ReadWriter, src *Source, opts Options) (*Stats, error) {
	if err := ValidName(opts.Name); err != nil {
		return nil, err
	}
	if opts.CheckpointBytes <= 0 {
		opts.CheckpointBytes = 64 << 20
	}
	cw := &countingRW{r: conn, w: conn}
	st := &Stats{ImageSize: src.VirtualSize, Digest: src.Digest}
	defer func() { st.Sent, st.Received = cw.out.Load(), cw.in.Load() }()
	fr := newFrameReader(cw)
	fw := newFrameWriter(cw)
	var e enc
	fw.writeMagic()
	h := &hello{Version: Version, Op: opPush, Name: opts.Name, Digest: src.Digest, VirtualSize: src.VirtualSize, Link: opts.Link}
	if opts.Cache != nil {
		for _, d := range opts.Cache.Digests(maxKnown) {
			if d != src.Digest {
				h.Known = append(h.Known, d)
			}
		}
	}
	fw.frame(frameHello, h.encode(&e))
	if err := fw.flush(); err != nil {
		return st, fmt.Errorf("%w: sending the hello: %v", ErrNoServer, err)
	}
	r, err := readReply(fr)
	if err != nil {
		return st, err
	}
	if r.Have {
		st.AlreadyCurrent = true
		if opts.Progress != nil {
			opts.Progress(src.VirtualSize)
		}
		return st, nil
	}
	n := int64(len(src.Blocks))
	if r.Resume > n {
		return st, protoErr("host resumes at block %d of %d", r.Resume, n)
	}
	st.ResumedAt = r.Resume
	// What the sender knows of the host's generations: every block hash of
	// those whose manifests it has cached (the host sent no index for them),
	// and 3- or 4-byte prefixes of the others' blocks from the index.
	k := &hostBlocks{
		full:  make([][]Hash, len(r.Gens)+1),
		at:    make([]map[int64]uint32, len(r.Gens)+1),
		exact: map[Hash]loc{},
		where: map[uint32]loc{},
	}
	known := map[[32]byte]bool{}
	for _, d := range h.Known {
		known[d] = true
	}
	for gi, g := range r.Gens {
		if !known[g.Digest] {
			continue
		}
		m, err := opts.Cache.Load(g.Digest)
		if err != nil || m.VirtualSize != g.VirtualSize {
			continue // the host sent no index for it: its blocks are not offered
		}
		st.CachedGens++
		k.full[gi+1] = m.Blocks
		for b, hh := range m.Blocks {
			if hh == ZeroHash {
				continue
			}
			if _, ok := k.exact[hh]; !ok {
				k.exact[hh] = loc{gi + 1, int64(b)}
			}
		}
	}
	k.width = r.Index
	if r.Index > 0 {
		var ents []indexEntry
		for {
			typ, p, err := fr.next()
			if err != nil {
				return st, noEOF(err)
			}
			if typ == frameError {
				return st, decodeError(p)
			}
			if typ == frameIndexEnd {
				break
			}
			if typ != frameIndex {
				return st, protoErr("got frame type %d in the index, want %d", typ, frameIndex)
			}
			var gen int
			gen, ents, err = decodeIndex(p, len(r.Gens), r.Index, ents[:0])
			if err != nil {
				return st, err
			}
			if k.full[gen] != nil {
				return st, protoErr("index of generation %d, which the sender knows", gen)
			}
			if k.at[gen] == nil {
				k.at[gen] = map[int64]uint32{}
				st.IndexedGens++
			}
			st.IndexEntries += int64(len(ents))
			for _, x := range ents {
				if x.Block >= blockCount(r.Gens[gen-1].VirtualSize) {
					return st, protoErr("index block %d beyond generation %d", x.Block, gen)
				}
				k.at[gen][x.Block] = x.Prefix
				if _, ok := k.where[x.Prefix]; !ok {
					k.where[x.Prefix] = loc{gen, x.Block}
				}
			}
		}
	}
	if opts.Progress != nil && r.Resume > 0 {
		opts.Progress(min(r.Resume*BlockSize, src.VirtualSize))
	}

	// From here on the host only speaks to report an error or a result.
	replies := make(chan frameOrErr, 1)
	go func() {
		for {
			typ, p, err := fr.next()
			cp := append([]byte(nil), p...)
			replies <- frameOrErr{typ, cp, err}
			if err != nil || typ == frameError {
				return
			}
		}
	}()
	s := &sender{ctx: ctx, src: src, opts: opts, fw: fw, st: st, replies: replies, host: k, self: map[Hash]int64{}}
	if err := s.init(); err != nil {
		return st, err
	}
	defer s.enc.Close()
	for i := int64(0); i < r.Resume; i++ {
		if _, ok := s.self[src.Blocks[i]]; !ok {
			s.self[src.Blocks[i]] = i
		}
	}
	if err := s.stream(r.Resume); err != nil {
		return st, s.explain(err)
	}
	for round := 0; ; round++ {
		fw.frame(frameEnd, e.reset())
		if err := fw.flush(); err != nil {
			return st, s.explain(err)
		}
		f := <-replies
		if f.err != nil {
			return st, fmt.Errorf("push: waiting for the host's result: %w", noEOF(f.err))
		}
		switch f.typ {
		case frameError:
			return st, decodeError(f.p)
		case frameResult:
		default:
			return st, protoErr("got frame type %d, want a result", f.typ)
		}
		res, err := decodeResult(f.p, n)
		if err != nil {
			return st, err
		}
		if len(res.Missing) == 0 {
			return st, nil
		}
		if round == 2 {
			return st, fmt.Errorf("push: the host still lacks %d block ranges after re-sending them twice", len(res.Missing))
		}
		for _, m := range res.Missing {
			for b := m.Start; b < m.Start+m.Count; b += maxLiteralBlocks {
				c := min(maxLiteralBlocks, m.Start+m.Count-b)
				if err := s.literal(b, c); err != nil {
					return st, s.explain(err)
				}
				st.ResentBlocks += c
			}
		}
	}
}

type frameOrErr struct {
	typ byte
	p   []byte
	err error
}

func readReply(fr *frameReader) (*reply, error) {
	if err := fr.readMagic(); err != nil {
		if errors.Is(err, ErrProtocol) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrNoServer, noEOF(err))
	}
	typ, p, err := fr.next()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoServer, noEOF(err))
	}
	if typ == frameError {
		return nil, decodeError(p)
	}
	if typ != frameReply {
		return nil, protoErr("got frame type %d, want a reply", typ)
	}
	r, err := decodeReply(p)
	if err != nil {
		return nil, err
	}
	if r.Err != "" {
		return nil, fmt.Errorf("%w: %s", ErrRemote, sanitize(r.Err))
	}
	return r, nil
}

type sender struct {
	ctx     context.Context
	src     *Source
	opts    Options
	fw      *frameWriter
	st      *Stats
	replies chan frameOrErr
	host    *hostBlocks
	self    map[Hash]int64
	enc     *zstd.Encoder
	e       enc
	buf     []byte
	zbuf    []byte
}

func (s *sender) init() error {
	level := s.opts.Level
	if level == 0 {
		level = zstd.SpeedDefault
	}
	var err error
	s.enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
	s.buf = make([]byte, maxLiteralBlocks*BlockSize)
	return err
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

// pending run being built
type pend struct {
	typ   byte
	start int64
	count int64
	gen   int
	src   int64
}

func (s *sender) stream(from int64) error {
	blocks := s.src.Blocks
	n := int64(len(blocks))
	var cur pend
	sinceCk := int64(0)
	flush := func() error {
		if cur.count == 0 {
			return nil
		}
		var err error
		switch cur.typ {
		case frameZero:
			s.st.ZeroBlocks += cur.count
			err = s.fw.frame(frameZero, (&op{Type: frameZero, Start: cur.start, Count: cur.count}).encode(&s.e))
		case frameCopy:
			s.st.CopiedBlocks += cur.count
			o := &op{Type: frameCopy, Start: cur.start, Count: cur.count, Gen: cur.gen, Src: cur.src, Sum: runSum(blocks[cur.start : cur.start+cur.count])}
			err = s.fw.frame(frameCopy, o.encode(&s.e))
		case frameLiteral:
			s.st.LiteralBlocks += cur.count
			err = s.literal(cur.start, cur.count)
		}
		if s.opts.Progress != nil {
			s.opts.Progress(min(cur.count*BlockSize, s.src.VirtualSize-cur.start*BlockSize))
		}
		sinceCk += cur.count * BlockSize
		end := cur.start + cur.count
		cur = pend{}
		if err != nil {
			return err
		}
		if sinceCk >= s.opts.CheckpointBytes {
			sinceCk = 0
			if err := s.fw.frame(frameCheckpoint, (&op{Type: frameCheckpoint, Start: end}).encode(&s.e)); err != nil {
				return err
			}
		}
		return nil
	}
	for i := from; i < n; i++ {
		if i&1023 == 0 {
			if err := s.ctx.Err(); err != nil {
				return err
			}
			if err := s.hostError(); err != nil {
				return err
			}
		}
		h := blocks[i]
		// Decide this block's run.
		var next pend
		switch {
		case h == ZeroHash:
			next = pend{typ: frameZero}
		default:
			if cur.typ == frameCopy && s.continues(cur, h) {
				cur.count++
				continue
			}
			if l, ok := s.host.exact[h]; ok {
				next = pend{typ: frameCopy, gen: l.gen, src: l.block}
			} else if l, ok := s.host.where[prefixOf(h, s.host.width)]; ok {
				next = pend{typ: frameCopy, gen: l.gen, src: l.block}
			} else if j, ok := s.self[h]; ok && j < i {
				next = pend{typ: frameCopy, gen: 0, src: j}
			} else {
				next = pend{typ: frameLiteral}
			}
			if _, ok := s.self[h]; !ok {
				s.self[h] = i
			}
		}
		if cur.count > 0 && next.typ == cur.typ && next.typ != frameCopy &&
			!(cur.typ == frameLiteral && cur.count == maxLiteralBlocks) {
			cur.count++
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		next.start, next.count = i, 1
		cur = next
	}
	return flush()
}

// continues reports whether block hash h extends copy run c by one block.
func (s *sender) continues(c pend, h Hash) bool {
	nb := c.src + c.count
	if c.gen == 0 {
		return nb < c.start && s.src.Blocks[nb] == h
	}
	return s.host.has(c.gen, nb, h)
}

// hostBlocks is what the sender knows of the blocks the host holds.
type hostBlocks struct {
	full  [][]Hash           // [gen]: every block hash, from a cached manifest
	at    []map[int64]uint32 // [gen]: block -> hash prefix, from the index
	exact map[Hash]loc       // hash -> first location in a cached generation
	where map[uint32]loc     // prefix -> first location in an indexed generation
	width int                // bytes of the index's prefixes
}

// has reports whether block b of generation gen (>= 1) probably holds h.
func (k *hostBlocks) has(gen int, b int64, h Hash) bool {
	if f := k.full[gen]; f != nil {
		return b < int64(len(f)) && f[b] == h
	}
	pf, ok := k.at[gen][b]
	return ok && pf == prefixOf(h, k.width)
}

// literal sends blocks [start, start+count) as one zstd frame.
func (s *sender) literal(start, count int64) error {
	buf := s.buf[:count*BlockSize]
	off := start * BlockSize
	n := min(int64(len(buf)), s.src.VirtualSize-off)
	if k, err := s.src.R.ReadAt(buf[:n], off); k < int(n) {
		return fmt.Errorf("push: reading the image at %d: %w", off, noEOF(err))
	}
	clear(buf[n:])
	s.zbuf = s.enc.EncodeAll(buf, s.zbuf[:0])
	return s.fw.frame(frameLiteral, (&op{Type: frameLiteral, Start: start, Count: count, Data: s.zbuf}).encode(&s.e))
}

// List asks the host at the other end of conn for its generations: of name,
// or of every name when name is "".
func List(ctx context.Context, conn io.ReadWriter, name string) ([]Generation, error) {
	if name != "" {
		if err := ValidName(name); err != nil {
			return nil, err
		}
	}
	fr := newFrameReader(conn)
	fw := newFrameWriter(conn)
	var e enc
	fw.writeMagic()
	fw.frame(frameHello, (&hello{Version: Version, Op: opList, Name: name}).encode(&e))
	if err := fw.flush(); err != nil {
		return nil, fmt.Errorf("%w: sending the hello: %v", ErrNoServer, err)
	}
	r, err := readReply(fr)
	if err != nil {
		return nil, err
	}
	return r.Gens, nil
}

func readManifestFile(path string) (*manifest.Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return manifest.Read(bufio.NewReaderSize(f, 1<<20))
}
