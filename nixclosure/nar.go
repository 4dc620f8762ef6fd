package nixclosure

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"
)

// NAR errors.
var (
	ErrNarOrder         = errors.New("nixclosure: NAR entry out of order")
	ErrNarHeader        = errors.New("nixclosure: invalid NAR header")
	ErrWriteTooLong     = errors.New("nixclosure: write too long")
	ErrWriteAfterClose  = errors.New("nixclosure: write after close")
	ErrNarIncomplete    = errors.New("nixclosure: NAR incomplete")
	errNarMissingHeader = fmt.Errorf("%w: Write before WriteHeader of a regular file", ErrNarHeader)
)

// NarType is the type of a NAR entry.
type NarType int

const (
	NarRegular NarType = iota
	NarDirectory
	NarSymlink
)

func (t NarType) String() string {
	switch t {
	case NarRegular:
		return "regular"
	case NarDirectory:
		return "directory"
	case NarSymlink:
		return "symlink"
	}
	return fmt.Sprintf("NarType(%d)", int(t))
}

// NarHeader describes one file system object in a NAR.
type NarHeader struct {
	Path       string  // relative to the root, "/"-separated; "" for the root itself
	Type       NarType // NarRegular, NarDirectory or NarSymlink
	Executable bool    // regular files only
	Size       int64   // regular files only: the number of bytes Write must supply
	Linkname   string  // symlinks only: the target, verbatim
}

// narDir is an open directory: its path and the last entry name written in it.
type narDir struct {
	path string
	last string
	root bool
}

// NarWriter writes a NAR (Nix archive) to an io.Writer, in the format of
// Nix's src/libutil/archive.cc: the "nix-archive-1" magic, then nested
// "(" type ... ")" nodes, every string preceded by its 64-bit little-endian
// length and padded with zeros to a multiple of 8 bytes.
//
// Entries must arrive in NAR order: the root first, then depth first with the
// entries of each directory sorted by name byte-wise (the order of Go's
// sort.Strings and os.ReadDir). A header that breaks the order returns
// ErrNarOrder. Regular files take exactly Size bytes through Write.
//
// Close finishes the archive; it does not close the underlying writer. Errors
// are sticky: after one, every call returns it.
type NarWriter struct {
	w          io.Writer
	err        error
	started    bool     // root header written
	done       bool     // root node complete (a non-directory root, or after Close)
	stack      []narDir // open directories, root first
	remain     int64    // bytes the current regular file still needs
	inFile     bool     // a regular file's contents are being written
	fileLen    int64    // size of the current regular file, for padding
	fileIsRoot bool
	closed     bool
	buf        []byte
}

// NewNarWriter returns a NarWriter writing to w.
func NewNarWriter(w io.Writer) *NarWriter {
	return &NarWriter{w: w}
}

var zeros [8]byte

func (n *NarWriter) str(s string) {
	n.buf = binary.LittleEndian.AppendUint64(n.buf, uint64(len(s)))
	n.buf = append(n.buf, s...)
	if p := len(s) % 8; p != 0 {
		n.buf = append(n.buf, zeros[:8-p]...)
	}
}

func (n *NarWriter) flush() error {
	if n.err != nil {
		return n.err
	}
	if len(n.buf) > 0 {
		_, n.err = n.w.Write(n.buf)
		n.buf = n.buf[:0]
	}
	return n.err
}

// finishFile pads and closes the current regular file, if any.
func (n *NarWriter) finishFile() error {
	if !n.inFile {
		return nil
	}
	if n.remain != 0 {
		n.err = fmt.Errorf("%w: regular file: got %d bytes, want %d", ErrNarIncomplete, n.fileLen-n.remain, n.fileLen)
		return n.err
	}
	if p := n.fileLen % 8; p != 0 {
		n.buf = append(n.buf, zeros[:8-p]...)
	}
	n.str(")")
	if !n.fileIsRoot {
		n.str(")") // the entry
	} else {
		n.done = true
	}
	n.inFile = false
	return nil
}

// closeDir closes the innermost open directory.
func (n *NarWriter) closeDir() {
	d := n.stack[len(n.stack)-1]
	n.stack = n.stack[:len(n.stack)-1]
	n.str(")")
	if d.root {
		n.done = true
	} else {
		n.str(")") // the entry
	}
}

func checkRelPath(p string) error {
	if p == "" {
		return nil
	}
	for _, c := range strings.Split(p, "/") {
		switch {
		case c == "", c == ".", c == "..":
			return fmt.Errorf("%w: path %q: invalid component %q", ErrNarHeader, p, c)
		case strings.IndexByte(c, 0) >= 0:
			return fmt.Errorf("%w: path %q contains NUL", ErrNarHeader, p)
		}
	}
	return nil
}

// WriteHeader starts a new entry. For a regular file, its contents follow
// through Write.
func (n *NarWriter) WriteHeader(h *NarHeader) error {
	if n.closed {
		return ErrWriteAfterClose
	}
	if n.err != nil {
		return n.err
	}
	if err := n.finishFile(); err != nil {
		return err
	}
	if err := checkHeader(h); err != nil {
		n.err = err
		return err
	}
	root := h.Path == ""
	if err := n.checkOrder(root, h.Path); err != nil {
		n.err = err
		return err
	}
	if root {
		n.started = true
		n.str("nix-archive-1")
	} else if err := n.openEntry(h.Path); err != nil {
		n.err = err
		return err
	}
	n.node(h, root)
	return n.flush()
}

// checkHeader checks a header's path, type, size and symlink target.
func checkHeader(h *NarHeader) error {
	if err := checkRelPath(h.Path); err != nil {
		return err
	}
	switch h.Type {
	case NarRegular:
		if h.Size < 0 {
			return fmt.Errorf("%w: %q: negative size %d", ErrNarHeader, h.Path, h.Size)
		}
	case NarSymlink:
		if h.Linkname == "" || strings.IndexByte(h.Linkname, 0) >= 0 {
			return fmt.Errorf("%w: %q: symlink target %q is empty or contains NUL", ErrNarHeader, h.Path, h.Linkname)
		}
	case NarDirectory:
	default:
		return fmt.Errorf("%w: %q: unknown type %v", ErrNarHeader, h.Path, h.Type)
	}
	return nil
}

// checkOrder checks that an entry at path (the root when root) may come
// now: the root once and first, nothing after a complete root.
func (n *NarWriter) checkOrder(root bool, path string) error {
	switch {
	case n.done:
		return fmt.Errorf("%w: %q after the root was complete", ErrNarOrder, path)
	case !n.started && !root:
		return fmt.Errorf("%w: got %q, want the root (\"\") first", ErrNarOrder, path)
	case n.started && root:
		return fmt.Errorf("%w: root given twice", ErrNarOrder)
	}
	return nil
}

// openEntry closes the directories that path is not in, checks that it
// comes in order in its own, and starts its directory entry.
func (n *NarWriter) openEntry(path string) error {
	parent, name := "", path
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		parent, name = path[:i], path[i+1:]
	}
	// Close directories until the parent is innermost.
	for len(n.stack) > 0 && n.stack[len(n.stack)-1].path != parent && !isUnder(parent, n.stack[len(n.stack)-1].path) {
		n.closeDir()
	}
	if len(n.stack) == 0 || n.stack[len(n.stack)-1].path != parent {
		return fmt.Errorf("%w: %q: its directory %q is not open (entries must be depth first, each directory right before its entries)", ErrNarOrder, path, parent)
	}
	d := &n.stack[len(n.stack)-1]
	if d.last != "" && name <= d.last {
		return fmt.Errorf("%w: %q after %q in directory %q: names must be sorted byte-wise and unique", ErrNarOrder, name, d.last, parent)
	}
	d.last = name
	n.str("entry")
	n.str("(")
	n.str("name")
	n.str(name)
	n.str("node")
	return nil
}

// node writes the entry's node up to its contents (a regular file), whole
// (a symlink) or opened (a directory).
func (n *NarWriter) node(h *NarHeader, root bool) {
	n.str("(")
	n.str("type")
	switch h.Type {
	case NarRegular:
		n.str("regular")
		if h.Executable {
			n.str("executable")
			n.str("")
		}
		n.str("contents")
		n.buf = binary.LittleEndian.AppendUint64(n.buf, uint64(h.Size))
		n.inFile, n.remain, n.fileLen, n.fileIsRoot = true, h.Size, h.Size, root
	case NarSymlink:
		n.str("symlink")
		n.str("target")
		n.str(h.Linkname)
		n.str(")")
		if root {
			n.done = true
		} else {
			n.str(")")
		}
	case NarDirectory:
		n.str("directory")
		n.stack = append(n.stack, narDir{path: h.Path, root: root})
	}
}

// isUnder reports whether p is strictly inside directory dir.
func isUnder(p, dir string) bool {
	if dir == "" {
		return p != ""
	}
	return strings.HasPrefix(p, dir+"/")
}

// Write writes contents of the current regular file.
func (n *NarWriter) Write(p []byte) (int, error) {
	if n.closed {
		return 0, ErrWriteAfterClose
	}
	if n.err != nil {
		return 0, n.err
	}
	if !n.inFile {
		n.err = errNarMissingHeader
		return 0, n.err
	}
	if err := n.flush(); err != nil {
		return 0, err
	}
	short := false
	if int64(len(p)) > n.remain {
		p = p[:n.remain]
		short = true
	}
	m, err := n.w.Write(p)
	n.remain -= int64(m)
	if err != nil {
		n.err = err
		return m, err
	}
	if short {
		return m, ErrWriteTooLong
	}
	return m, nil
}

// ReadFrom copies a regular file's contents from r (at most the remaining
// size), so io.Copy skips an intermediate buffer.
func (n *NarWriter) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(struct{ io.Writer }{n}, r)
}

// Close finishes the archive: the current file and every open directory. It
// does not close the underlying writer.
func (n *NarWriter) Close() error {
	if n.closed {
		return n.err
	}
	if n.err != nil {
		n.closed = true
		return n.err
	}
	if !n.started {
		n.err = fmt.Errorf("%w: no root entry", ErrNarIncomplete)
	} else if err := n.finishFile(); err == nil {
		for len(n.stack) > 0 {
			n.closeDir()
		}
		n.flush()
	}
	n.closed = true
	return n.err
}

// NarHasher computes the NAR hash and size of a store path the way
// `nix-store --query --hash` does. Feed it like a NarWriter, Close it, then
// call Sum.
type NarHasher struct {
	*NarWriter
	h hash.Hash
	c countWriter
}

type countWriter struct {
	h hash.Hash
	n uint64
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += uint64(len(p))
	return c.h.Write(p)
}

// NewNarHasher returns a NarHasher.
func NewNarHasher() *NarHasher {
	nh := &NarHasher{h: sha256.New()}
	nh.c.h = nh.h
	nh.NarWriter = NewNarWriter(&nh.c)
	return nh
}

// Sum returns the NAR hash "sha256:<nix32>" and the NAR size. Call it after
// Close.
func (nh *NarHasher) Sum() (string, uint64) {
	return "sha256:" + EncodeNix32(nh.h.Sum(nil)), nh.c.n
}
