package imagebuild

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
)

// ErrUnsupportedFile reports a store path entry that neither a NAR nor
// the image can hold: FIFOs, sockets and device nodes.
var ErrUnsupportedFile = errors.New("imagebuild: unsupported file type in store path")

type kind uint8

const (
	kindReg kind = iota
	kindDir
	kindSymlink
)

// node is one entry of a scanned store path, held in NAR order.
type node struct {
	name     string // base name; "" for a store path's root
	kind     kind
	exec     bool
	size     int64
	target   string  // symlink target
	children []*node // sorted by name, byte-wise (NAR order)
	first    *node   // for a hard link: the node that owns the inode
	parent   *node   // nil for a store path's root
	storeDir string  // a store path's root: its path
}

// imagePath is the path of n in the image, relative to the root.
func imagePath(n *node) string {
	if n.parent == nil {
		return strings.TrimPrefix(n.storeDir, "/")
	}
	return imagePath(n.parent) + "/" + n.name
}

type inodeKey struct{ dev, ino uint64 }

// scanner walks store paths with lstat and readdir only; the ext4 Planner
// sizes the image from what it found. File contents are read later, once,
// while they stream into the image.
type scanner struct {
	links map[inodeKey]*node
	bytes int64 // regular file bytes, each inode once
	files uint64
}

func newScanner() *scanner { return &scanner{links: map[inodeKey]*node{}} }

const blockSize = 4096

func blocksFor(n int64) uint64 { return uint64((n + blockSize - 1) / blockSize) }

// scanStore is the first phase: it reads every store path's tree with
// lstat and readdir, so the plan can size the image before any file is
// read.
func (b *builder) scanStore() error {
	t0 := time.Now()
	b.scan = newScanner()
	for _, p := range b.opts.Closure.Paths {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		t, err := b.scan.scan(p.Path)
		if os.IsNotExist(err) {
			return fmt.Errorf("%w: %s: realise it first (nix-store --realise %s) or build where it exists: %w", ErrMissing, p.Path, p.Path, err)
		}
		if err != nil {
			return fmt.Errorf("scan %s: %w", p.Path, err)
		}
		b.trees = append(b.trees, t)
	}
	b.logf("scanned %d store paths: %d files, %s of data (%s)", len(b.opts.Closure.Paths), b.scan.files, units.Bytes(b.scan.bytes), since(t0))
	return nil
}

// scan reads the tree at src into nodes.
func (s *scanner) scan(src string) (*node, error) {
	fi, err := os.Lstat(src)
	if err != nil {
		return nil, err
	}
	n, err := s.scanInfo(src, "", fi)
	if n != nil {
		n.storeDir = src
	}
	return n, err
}

func (s *scanner) scanInfo(src, name string, fi fs.FileInfo) (*node, error) {
	n := &node{name: name}
	switch m := fi.Mode(); {
	case m.IsRegular():
		n.kind = kindReg
		n.exec = m&0o100 != 0
		n.size = fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
			k := inodeKey{uint64(st.Dev), st.Ino}
			if first, ok := s.links[k]; ok {
				n.first = first
				return n, nil
			}
			s.links[k] = n
		}
		s.files++
		s.bytes += n.size
	case m&fs.ModeSymlink != 0:
		n.kind = kindSymlink
		t, err := os.Readlink(src)
		if err != nil {
			return nil, err
		}
		n.target = t
	case m.IsDir():
		n.kind = kindDir
		f, err := os.Open(src)
		if err != nil {
			return nil, err
		}
		ents, err := f.Readdir(-1)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read directory %s: %w", src, err)
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
		for _, e := range ents {
			c, err := s.scanInfo(filepath.Join(src, e.Name()), e.Name(), e)
			if err != nil {
				return nil, err
			}
			c.parent = n
			n.children = append(n.children, c)
		}
	default:
		return nil, fmt.Errorf("%w: %s is a %s; Nix store paths hold only regular files, directories and symlinks, so rebuild the path without it", ErrUnsupportedFile, src, describeMode(fi.Mode()))
	}
	return n, nil
}

func describeMode(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "FIFO"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device node"
	}
	return "special file (" + m.String() + ")"
}

// walk calls fn for n and every node below it in NAR order, with the path
// relative to the store path's root ("" for the root).
func walk(n *node, rel string, fn func(n *node, rel string) error) error {
	if err := fn(n, rel); err != nil {
		return err
	}
	for _, c := range n.children {
		if err := walk(c, path.Join(rel, c.name), fn); err != nil {
			return err
		}
	}
	return nil
}
