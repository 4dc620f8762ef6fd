// Package push sends a disk image to a host's image store, moving only the
// 4 KiB blocks the host does not already hold, and runs the host half
// (Serve) behind `nixvm-image serve`.
//
// Identity is the guest-visible content: BLAKE3-128 of each 4 KiB block of
// the virtual disk, matched at any offset of any generation the host holds;
// an image's digest is BLAKE3 over its block hashes (package manifest). A
// session is one exchange (the host's generations, a resume point, and an
// index of 3-byte hash prefixes of the blocks the sender does not know yet)
// and then one pipelined stream of zero runs, copy runs and zstd literals,
// with checkpoints the host makes durable so a broken connection resumes
// where it stopped. The host checks every copied block against its own index
// as it copies (a failed block is asked for again as a literal), recomputes
// the digest of what it wrote, and only then stores the generation and
// swaps `current` (package store).
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
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// Options configure a push. The zero value is the default, except Name.
type Options struct {
	// Name of the image on the host (one path element), required.
	Name string
	// Link, if set, is an absolute path on the host made a symlink to the
	// new generation, e.g. /etc/virt/base-images/baseline.qcow2.
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

// ErrLink reports a Link that is not an absolute path.
var ErrLink = errors.New("push: bad link path")

// Validate checks Name (store.ErrName) and Link (ErrLink).
func (o *Options) Validate() error {
	if err := store.ValidName(o.Name); err != nil {
		return err
	}
	if o.Link != "" && !strings.HasPrefix(o.Link, "/") {
		return fmt.Errorf("%w: %q must be an absolute path on the host", ErrLink, o.Link)
	}
	if len(o.Link) > maxPath {
		return fmt.Errorf("%w: %d bytes, max %d", ErrLink, len(o.Link), maxPath)
	}
	return nil
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

// Push sends src to the host at the other end of conn and returns once the
// host has verified and activated it.
func Push(ctx context.Context, conn io.ReadWriter, src *Source, opts Options) (*Stats, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.CheckpointBytes <= 0 {
		opts.CheckpointBytes = 64 << 20
	}
	cw := &countingRW{r: conn, w: conn}
	st := &Stats{ImageSize: src.VirtualSize, Digest: src.Digest}
	defer func() { st.Sent, st.Received = cw.out.Load(), cw.in.Load() }()
	fr, fw := newFrameReader(cw), newFrameWriter(cw)
	h := newHello(src, opts)
	r, err := handshake(fr, fw, h)
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
	if n := int64(len(src.Blocks)); r.Resume > n {
		return st, protoErr("host resumes at block %d of %d", r.Resume, n)
	}
	st.ResumedAt = r.Resume
	k := knownHostBlocks(r, h, opts.Cache, st)
	if err := k.readIndex(fr, r, int64(len(src.Blocks)), st); err != nil {
		return st, err
	}
	if opts.Progress != nil && r.Resume > 0 {
		opts.Progress(min(r.Resume*manifest.BlockSize, src.VirtualSize))
	}
	// From here on the host only speaks to report an error or a result.
	s, err := newSender(ctx, src, opts, fw, st, readReplies(fr), k)
	if err != nil {
		return st, err
	}
	defer s.enc.Close()
	return st, s.run(r.Resume)
}

// newHello opens a push of src, listing the cached manifests (but src's own).
func newHello(src *Source, opts Options) *hello {
	h := &hello{Version: Version, Op: opPush, Name: opts.Name, Digest: src.Digest, VirtualSize: src.VirtualSize, Link: opts.Link}
	if opts.Cache != nil {
		for _, d := range opts.Cache.Digests(maxKnown) {
			if d != src.Digest {
				h.Known = append(h.Known, d)
			}
		}
	}
	return h
}

// handshake sends the magic and h, and reads the host's reply.
func handshake(fr *frameReader, fw *frameWriter, h *hello) (*reply, error) {
	var e enc
	fw.writeMagic()
	fw.frame(frameHello, h.encode(&e))
	if err := fw.flush(); err != nil {
		return nil, fmt.Errorf("%w: sending the hello: %v", ErrNoServer, err)
	}
	return readReply(fr)
}

type frameOrErr struct {
	typ byte
	p   []byte
	err error
}

// readReplies delivers the frames the host sends during the stream, until
// an error or an error frame.
func readReplies(fr *frameReader) chan frameOrErr {
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
	return replies
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

// List asks the host at the other end of conn for its generations: of name,
// or of every name when name is "".
func List(ctx context.Context, conn io.ReadWriter, name string) ([]store.Generation, error) {
	if name != "" {
		if err := store.ValidName(name); err != nil {
			return nil, err
		}
	}
	r, err := handshake(newFrameReader(conn), newFrameWriter(conn), &hello{Version: Version, Op: opList, Name: name})
	if err != nil {
		return nil, err
	}
	return r.Gens, nil
}
