// Package cpio reads and writes cpio archives in the "newc" (SVR4, magic
// 070701) format, the format the Linux kernel unpacks as an initramfs
// (Documentation/driver-api/early-userspace/buffer-format.rst).
//
// It is io-shaped like archive/tar: a Writer takes an io.Writer, WriteHeader
// starts an entry, Write supplies its data, Close writes the TRAILER!!! entry.
// Output is deterministic: every field of the header, including inode number
// and mtime, comes from the caller; an Ino of 0 is replaced by a sequence
// number (1, 2, 3, ...) so that the same calls give the same bytes.
//
// Limits: newc fields are 32-bit, so an entry's size is at most 4 GiB - 1 and
// mtimes are 0..2^32-1. The CRC variant (070702) is not written; the reader
// accepts it but does not verify checksums. Hard links are written as the
// caller gives them (same Ino, NLink > 1, data on one of them).
package cpio

import (
	"errors"
	"fmt"
	"io"
	"strconv"
)

// File type bits of Header.Mode (the st_mode layout cpio uses).
const (
	TypeMask    = 0o170000
	TypeSocket  = 0o140000
	TypeSymlink = 0o120000
	TypeReg     = 0o100000
	TypeBlock   = 0o060000
	TypeDir     = 0o040000
	TypeChar    = 0o020000
	TypeFifo    = 0o010000
)

const (
	magicNewc    = "070701"
	magicNewcCRC = "070702"
	headerLen    = 110
	trailerName  = "TRAILER!!!"
)

var (
	// ErrWriteAfterClose is returned by calls on a closed Writer.
	ErrWriteAfterClose = errors.New("cpio: write after close")
	// ErrWriteTooLong is returned when more data is written than Header.Size.
	ErrWriteTooLong = errors.New("cpio: write too long")
	// ErrMissingData is returned when an entry got less data than Header.Size.
	ErrMissingData = errors.New("cpio: missing data")
	// ErrFieldTooLong is returned when a header value does not fit newc.
	ErrFieldTooLong = errors.New("cpio: header field out of range")
	// ErrHeader is returned by the Reader for a malformed header.
	ErrHeader = errors.New("cpio: invalid header")
)

// Header is one archive entry.
type Header struct {
	Name     string // path inside the archive, e.g. "bin/busybox" (no leading "/")
	Mode     uint32 // permission bits and a Type* constant; Type 0 means TypeReg
	UID, GID uint32
	NLink    uint32 // 0 means 1 (2 for directories)
	MTime    int64  // seconds since the epoch
	Size     int64  // data length; for symlinks it is set from Linkname
	Ino      uint32 // 0 means "assign the next sequence number"
	Linkname string // symlink target (TypeSymlink only); written as the data

	DevMajor, DevMinor   uint32 // device holding the file (usually 0)
	RDevMajor, RDevMinor uint32 // device number of a TypeChar/TypeBlock node
}

// Writer writes a newc archive. Errors are sticky.
type Writer struct {
	w       io.Writer
	err     error
	remain  int64 // data bytes still owed for the current entry
	pad     int   // padding after the current entry's data
	nextIno uint32
	closed  bool
	written int64
}

// NewWriter returns a Writer writing to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w, nextIno: 1} }

func pad4(n int64) int { return int((4 - n%4) % 4) }

var zeros [4]byte

func (w *Writer) write(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.written += int64(n)
	w.err = err
}

func (w *Writer) finishEntry() error {
	if w.remain > 0 {
		return fmt.Errorf("%w: %d bytes of the previous entry not written", ErrMissingData, w.remain)
	}
	w.write(zeros[:w.pad])
	w.pad = 0
	return w.err
}

// WriteHeader finishes the previous entry and writes hdr. For symlinks it
// also writes Linkname as the entry's data.
func (w *Writer) WriteHeader(hdr *Header) error {
	if w.closed {
		return ErrWriteAfterClose
	}
	if w.err != nil {
		return w.err
	}
	if err := w.finishEntry(); err != nil {
		w.err = err
		return err
	}
	h := *hdr
	if h.Mode&TypeMask == 0 {
		h.Mode |= TypeReg
	}
	if h.Mode&TypeMask == TypeSymlink {
		h.Size = int64(len(h.Linkname))
	}
	if h.NLink == 0 {
		h.NLink = 1
		if h.Mode&TypeMask == TypeDir {
			h.NLink = 2
		}
	}
	if h.Ino == 0 {
		h.Ino = w.nextIno
		w.nextIno++
	}
	if err := w.writeRaw(&h); err != nil {
		return err
	}
	w.remain = h.Size
	w.pad = pad4(h.Size)
	if h.Mode&TypeMask == TypeSymlink {
		if _, err := w.Write([]byte(h.Linkname)); err != nil {
			return err
		}
	}
	return nil
}

func (w *Writer) writeRaw(h *Header) error {
	if h.Name == "" || len(h.Name)+1 > 0xffffffff {
		w.err = fmt.Errorf("%w: name %q", ErrFieldTooLong, h.Name)
		return w.err
	}
	if h.Size < 0 || h.Size > 0xffffffff || h.MTime < 0 || h.MTime > 0xffffffff {
		w.err = fmt.Errorf("%w: %q: size %d, mtime %d (both must be 0..4294967295)", ErrFieldTooLong, h.Name, h.Size, h.MTime)
		return w.err
	}
	buf := make([]byte, 0, headerLen+len(h.Name)+4)
	buf = append(buf, magicNewc...)
	for _, v := range []uint32{h.Ino, h.Mode, h.UID, h.GID, h.NLink, uint32(h.MTime), uint32(h.Size),
		h.DevMajor, h.DevMinor, h.RDevMajor, h.RDevMinor, uint32(len(h.Name) + 1), 0} {
		buf = fmt.Appendf(buf, "%08x", v)
	}
	buf = append(buf, h.Name...)
	buf = append(buf, 0)
	buf = append(buf, zeros[:pad4(int64(len(buf)))]...)
	w.write(buf)
	return w.err
}

// Write writes data of the current entry.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, ErrWriteAfterClose
	}
	if w.err != nil {
		return 0, w.err
	}
	if int64(len(p)) > w.remain {
		n, _ := w.Write(p[:w.remain])
		return n, ErrWriteTooLong
	}
	before := w.written
	w.write(p)
	n := int(w.written - before)
	w.remain -= int64(n)
	return n, w.err
}

// Close finishes the last entry and writes the trailer. It does not close the
// underlying writer. Later calls return ErrWriteAfterClose.
func (w *Writer) Close() error {
	if w.closed {
		return ErrWriteAfterClose
	}
	if w.err == nil {
		if err := w.finishEntry(); err != nil {
			w.err = err
		}
	}
	if w.err == nil {
		w.writeRaw(&Header{Name: trailerName, NLink: 1})
	}
	w.closed = true
	return w.err
}

// Reader reads a newc archive. It exists mainly to test the Writer; it
// stops at the TRAILER!!! entry.
type Reader struct {
	r      io.Reader
	remain int64
	pad    int
	err    error
}

// NewReader returns a Reader reading from r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Next skips to the next entry and returns its header, or io.EOF after the
// trailer.
func (r *Reader) Next() (*Header, error) {
	if r.err != nil {
		return nil, r.err
	}
	h, err := r.next()
	if err != nil {
		r.err = err
		return nil, err
	}
	return h, nil
}

func (r *Reader) next() (*Header, error) {
	if _, err := io.CopyN(io.Discard, r.r, r.remain+int64(r.pad)); err != nil {
		return nil, noEOF(err)
	}
	r.remain, r.pad = 0, 0
	h, err := r.readHeader()
	if err != nil {
		return nil, err
	}
	if h.Name == trailerName {
		return nil, io.EOF
	}
	r.remain, r.pad = h.Size, pad4(h.Size)
	if h.Mode&TypeMask == TypeSymlink {
		if h.Size > 1<<20 {
			return nil, fmt.Errorf("%w: symlink %q target length %d", ErrHeader, h.Name, h.Size)
		}
		lb := make([]byte, h.Size)
		if _, err := io.ReadFull(r, lb); err != nil {
			return nil, noEOF(err)
		}
		h.Linkname = string(lb)
	}
	return h, nil
}

// readHeader reads a header and its name.
func (r *Reader) readHeader() (*Header, error) {
	var hb [headerLen]byte
	if _, err := io.ReadFull(r.r, hb[:]); err != nil {
		return nil, noEOF(err)
	}
	if m := string(hb[:6]); m != magicNewc && m != magicNewcCRC {
		return nil, fmt.Errorf("%w: magic got %q, want %q", ErrHeader, m, magicNewc)
	}
	var f [13]uint32
	for i := range f {
		s := string(hb[6+8*i : 14+8*i])
		v, err := strconv.ParseUint(s, 16, 32)
		if err != nil {
			return nil, fmt.Errorf("%w: field %d got %q, want 8 hex digits", ErrHeader, i, s)
		}
		f[i] = uint32(v)
	}
	nameLen := int64(f[11])
	if nameLen < 1 || nameLen > 1<<20 {
		return nil, fmt.Errorf("%w: name length got %d, want 1..%d", ErrHeader, nameLen, 1<<20)
	}
	nb := make([]byte, nameLen+int64(pad4(headerLen+nameLen)))
	if _, err := io.ReadFull(r.r, nb); err != nil {
		return nil, noEOF(err)
	}
	if nb[nameLen-1] != 0 {
		return nil, fmt.Errorf("%w: name not NUL-terminated", ErrHeader)
	}
	return &Header{
		Ino: f[0], Mode: f[1], UID: f[2], GID: f[3], NLink: f[4], MTime: int64(f[5]), Size: int64(f[6]),
		DevMajor: f[7], DevMinor: f[8], RDevMajor: f[9], RDevMinor: f[10],
		Name: string(nb[:nameLen-1]),
	}, nil
}

// Read reads the current entry's data.
func (r *Reader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.remain == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.remain {
		p = p[:r.remain]
	}
	n, err := r.r.Read(p)
	r.remain -= int64(n)
	if err == io.EOF && r.remain > 0 {
		r.err = io.ErrUnexpectedEOF
		return n, r.err
	}
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, r.err
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
