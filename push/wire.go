package push

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// Wire format.
//
// A session starts with the 8-byte magic "nixvmimg" from each side, then
// frames. A frame is one type byte, its payload length as an unsigned
// varint, and the payload. Integers inside payloads are unsigned varints,
// strings are a varint length and bytes, hashes and digests are raw bytes.
//
//	sender                                 host
//	magic, Hello{version, op, name, ...,   ->
//	       digests of cached manifests}
//	                                       <- magic, Reply{version, gens, resume}
//	                                       <- Index chunks, IndexEnd (only when needed)
//	Zero/Copy/Literal/Checkpoint ... End   ->   (one pipelined stream)
//	                                       <- Result{missing ranges} (only after a
//	                                          failed copy; the sender re-sends
//	                                          those blocks as literals, then End)
//	                                       <- Result{ok} after the digest check
//
// Either side may send Error instead of the next frame; the session ends.
const magic = "nixvmimg"

// Version is the protocol version this package speaks. A peer with another
// version gets ErrVersion naming both.
//
// Version 2: the hello lists the digests of generations whose manifests the
// sender has cached (the host sends no index for them), and index entries
// carry 3- or 4-byte hash prefixes (the reply says which) with block
// numbers as runs.
const Version = 2

// Frame types.
const (
	frameHello      = 1
	frameReply      = 2
	frameIndex      = 3
	frameIndexEnd   = 4
	frameZero       = 5
	frameCopy       = 6
	frameLiteral    = 7
	frameCheckpoint = 8
	frameEnd        = 9
	frameResult     = 10
	frameError      = 11
)

// Operations a Hello asks for.
const (
	opPush = 1
	opList = 2
)

// Bounds on everything a peer sends.
const (
	maxFrame         = 2 << 20       // payload bytes of one frame
	maxLiteralBlocks = 256           // blocks in one literal frame (1 MiB)
	maxName          = store.MaxName // image name bytes
	maxPath          = 4096          // --link path bytes
	maxMessage       = 4096          // error message bytes
	maxGenerations   = 1024          // generations listed in a reply
	maxVirtualSize   = manifest.MaxVirtualSize
	maxIndexEntries  = maxFrame / 5  // entries in one index frame
	maxKnown         = 64            // cached generations a hello lists
	maxRanges        = maxFrame / 20 // missing ranges in one result
	maxBlocks        = maxVirtualSize / manifest.BlockSize
	_                = maxBlocks
)

var (
	// ErrProtocol reports a malformed or out-of-bounds frame from the peer.
	ErrProtocol = errors.New("push: protocol error")
	// ErrVersion reports a peer speaking another protocol version.
	ErrVersion = errors.New("push: incompatible protocol version")
	// ErrRemote wraps an error the peer reported.
	ErrRemote = errors.New("push: remote error")
)

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// frameWriter writes frames; its error is sticky.
type frameWriter struct {
	w   *bufio.Writer
	buf []byte
	err error
}

func newFrameWriter(w io.Writer) *frameWriter {
	return &frameWriter{w: bufio.NewWriterSize(w, 256<<10)}
}

func (fw *frameWriter) writeMagic() error {
	if fw.err == nil {
		_, fw.err = fw.w.WriteString(magic)
	}
	return fw.err
}

// frame writes one frame with the payload built in e.
func (fw *frameWriter) frame(typ byte, e *enc) error {
	if fw.err != nil {
		return fw.err
	}
	if len(e.b) > maxFrame {
		fw.err = fmt.Errorf("BUG: push: frame type %d has %d bytes, max %d", typ, len(e.b), maxFrame)
		return fw.err
	}
	fw.buf = append(fw.buf[:0], typ)
	fw.buf = binary.AppendUvarint(fw.buf, uint64(len(e.b)))
	if _, err := fw.w.Write(fw.buf); err != nil {
		fw.err = err
		return err
	}
	if _, err := fw.w.Write(e.b); err != nil {
		fw.err = err
	}
	return fw.err
}

func (fw *frameWriter) flush() error {
	if fw.err == nil {
		fw.err = fw.w.Flush()
	}
	return fw.err
}

// frameReader reads frames; the payload buffer is reused between calls.
type frameReader struct {
	r   *bufio.Reader
	buf []byte
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 256<<10)}
}

func (fr *frameReader) readMagic() error {
	var m [len(magic)]byte
	if _, err := io.ReadFull(fr.r, m[:]); err != nil {
		return err
	}
	if string(m[:]) != magic {
		return protoErr("peer did not start with the nixvm-image magic: got %q, want %q", m[:], magic)
	}
	return nil
}

// next reads one frame. The payload is valid until the next call.
func (fr *frameReader) next() (byte, []byte, error) {
	typ, err := fr.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, err := binary.ReadUvarint(fr.r)
	if err != nil {
		return 0, nil, noEOF(err)
	}
	if n > maxFrame {
		return 0, nil, protoErr("frame type %d is %d bytes, max %d", typ, n, maxFrame)
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n)
	}
	fr.buf = fr.buf[:n]
	if _, err := io.ReadFull(fr.r, fr.buf); err != nil {
		return 0, nil, noEOF(err)
	}
	return typ, fr.buf, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// enc builds a payload.
type enc struct{ b []byte }

func (e *enc) reset() *enc         { e.b = e.b[:0]; return e }
func (e *enc) u(v uint64) *enc     { e.b = binary.AppendUvarint(e.b, v); return e }
func (e *enc) raw(p []byte) *enc   { e.b = append(e.b, p...); return e }
func (e *enc) str(s string) *enc   { e.u(uint64(len(s))); e.b = append(e.b, s...); return e }
func (e *enc) bytes(p []byte) *enc { e.u(uint64(len(p))); e.b = append(e.b, p...); return e }

// dec parses a payload; the first error is sticky and later reads return zero.
type dec struct {
	b   []byte
	err error
}

func (d *dec) fail(format string, args ...any) {
	if d.err == nil {
		d.err = protoErr(format, args...)
	}
}

func (d *dec) u() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

// ub reads a varint and checks it is at most max.
func (d *dec) ub(what string, max uint64) uint64 {
	v := d.u()
	if d.err == nil && v > max {
		d.fail("%s is %d, max %d", what, v, max)
		return 0
	}
	return v
}

func (d *dec) raw(n int) []byte {
	if d.err != nil {
		return make([]byte, n)
	}
	if len(d.b) < n {
		d.fail("payload too short: got %d bytes, want %d", len(d.b), n)
		return make([]byte, n)
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *dec) str(what string, max int) string {
	n := d.ub(what+" length", uint64(max))
	return string(d.raw(int(n)))
}

func (d *dec) rest() []byte {
	p := d.b
	d.b = nil
	return p
}

// done reports the sticky error, or trailing bytes.
func (d *dec) done() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	return d.err
}
