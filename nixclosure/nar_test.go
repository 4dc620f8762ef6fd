package nixclosure

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

func TestNarWriterErrors(t *testing.T) {
	dir := func(p string) *NarHeader { return &NarHeader{Path: p, Type: NarDirectory} }
	file := func(p string, n int64) *NarHeader { return &NarHeader{Path: p, Type: NarRegular, Size: n} }
	link := func(p, to string) *NarHeader { return &NarHeader{Path: p, Type: NarSymlink, Linkname: to} }
	tests := []struct {
		name     string
		headers  []*NarHeader
		data     map[int]string // bytes written after header i
		err      error          // from WriteHeader/Write
		closeErr error
	}{
		{name: "ok", headers: []*NarHeader{dir(""), dir("a"), file("a/b", 1), dir("a/c"), link("a/c/d", "x"), file("b", 0)}, data: map[int]string{2: "x"}},
		{name: "no root first", headers: []*NarHeader{file("a", 0)}, err: ErrNarOrder},
		{name: "root twice", headers: []*NarHeader{dir(""), dir("")}, err: ErrNarOrder},
		{name: "after file root", headers: []*NarHeader{file("", 0), file("a", 0)}, err: ErrNarOrder},
		{name: "after symlink root", headers: []*NarHeader{link("", "x"), file("a", 0)}, err: ErrNarOrder},
		{name: "unsorted", headers: []*NarHeader{dir(""), file("b", 0), file("a", 0)}, err: ErrNarOrder},
		{name: "byte order", headers: []*NarHeader{dir(""), file("a", 0), file("B", 0)}, err: ErrNarOrder},
		{name: "duplicate", headers: []*NarHeader{dir(""), file("a", 0), file("a", 0)}, err: ErrNarOrder},
		{name: "parent missing", headers: []*NarHeader{dir(""), file("a/b", 0)}, err: ErrNarOrder},
		{name: "parent is a file", headers: []*NarHeader{dir(""), file("a", 0), file("a/b", 0)}, err: ErrNarOrder},
		{name: "parent closed", headers: []*NarHeader{dir(""), dir("a"), file("b", 0), file("a/c", 0)}, err: ErrNarOrder},
		{name: "not depth first", headers: []*NarHeader{dir(""), dir("a"), dir("b"), file("a/x", 0)}, err: ErrNarOrder},
		{name: "dot component", headers: []*NarHeader{dir(""), file("./a", 0)}, err: ErrNarHeader},
		{name: "dotdot", headers: []*NarHeader{dir(""), file("..", 0)}, err: ErrNarHeader},
		{name: "empty component", headers: []*NarHeader{dir(""), dir("a"), file("a//b", 0)}, err: ErrNarHeader},
		{name: "trailing slash", headers: []*NarHeader{dir(""), dir("a/")}, err: ErrNarHeader},
		{name: "nul", headers: []*NarHeader{dir(""), file("a\x00", 0)}, err: ErrNarHeader},
		{name: "empty link", headers: []*NarHeader{dir(""), link("a", "")}, err: ErrNarHeader},
		{name: "negative size", headers: []*NarHeader{file("", -1)}, err: ErrNarHeader},
		{name: "bad type", headers: []*NarHeader{{Type: NarType(7)}}, err: ErrNarHeader},
		{name: "short file", headers: []*NarHeader{dir(""), file("a", 2), file("b", 0)}, data: map[int]string{1: "x"}, err: ErrNarIncomplete},
		{name: "short file at close", headers: []*NarHeader{file("", 2)}, closeErr: ErrNarIncomplete},
		{name: "long file", headers: []*NarHeader{file("", 1)}, data: map[int]string{0: "xy"}, err: ErrWriteTooLong},
		{name: "write to dir", headers: []*NarHeader{dir("")}, data: map[int]string{0: "x"}, err: ErrNarHeader},
		{name: "empty", closeErr: ErrNarIncomplete},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			nw := NewNarWriter(&buf)
			var err error
			for i, h := range tt.headers {
				if err = nw.WriteHeader(h); err != nil {
					break
				}
				if d, ok := tt.data[i]; ok {
					if _, err = nw.Write([]byte(d)); err != nil {
						break
					}
				}
			}
			if !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("got %v, want %v", err, tt.err)
			}
			cerr := nw.Close()
			want := tt.closeErr
			if tt.err != nil && !errors.Is(tt.err, ErrWriteTooLong) {
				want = tt.err // sticky
			}
			if !errors.Is(cerr, want) || (cerr == nil) != (want == nil) {
				t.Fatalf("Close: got %v, want %v", cerr, want)
			}
			if err := nw.WriteHeader(dir("z")); !errors.Is(err, ErrWriteAfterClose) {
				t.Errorf("WriteHeader after Close: got %v, want ErrWriteAfterClose", err)
			}
			if tt.err == nil && tt.closeErr == nil {
				if _, err := readNar(buf.Bytes()); err != nil {
					t.Errorf("output does not decode: %v", err)
				}
			}
		})
	}
}

// TestNarHasherEmptyFile checks the smallest NAR against the value Nix
// reports for an empty regular file (`nix-hash --type sha256 --base32`
// of a NAR with an empty file is its NAR hash; here: nix-store --dump).
func TestNarHasherMatchesNixStoreDump(t *testing.T) {
	nixStore := testutil.NeedTool(t, "nix-store")[0]
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	want, err := exec.Command(nixStore, "--dump", p).Output()
	if err != nil {
		t.Fatal(err)
	}
	nh := NewNarHasher()
	if err := nh.WriteHeader(&NarHeader{Type: NarRegular}); err != nil {
		t.Fatal(err)
	}
	if err := nh.Close(); err != nil {
		t.Fatal(err)
	}
	h, n := nh.Sum()
	if n != uint64(len(want)) || h != "sha256:"+EncodeNix32(sha256Bytes(want)) {
		t.Errorf("got %s %d, want %s %d", h, n, "sha256:"+EncodeNix32(sha256Bytes(want)), len(want))
	}
}

// node is an in-memory file system tree for the round-trip fuzz test.
type node struct {
	typ      NarType
	exec     bool
	data     []byte
	target   string
	children map[string]*node
}

// treeFromBytes builds a tree from fuzz input: the first byte picks the
// root's type, then each 4 bytes add one entry to a directory.
func treeFromBytes(b []byte) *node {
	const alpha = "aAbB0.-_zZ+="
	next := func() byte {
		if len(b) == 0 {
			return 0
		}
		c := b[0]
		b = b[1:]
		return c
	}
	root := &node{typ: NarDirectory, children: map[string]*node{}}
	switch next() % 8 {
	case 0:
		return &node{typ: NarRegular, exec: next()%2 == 1, data: bytes.Repeat([]byte{next()}, int(next()))}
	case 1:
		return &node{typ: NarSymlink, target: "t" + strings.Repeat("x", int(next()%20))}
	}
	dirs := []*node{root}
	for len(b) > 0 {
		parent := dirs[int(next())%len(dirs)]
		op, l := next(), next()
		name := string(alpha[int(op>>2)%len(alpha)])
		if l&0x80 != 0 {
			name += string(alpha[int(l)%len(alpha)])
		}
		if name == "." || name == ".." || parent.children[name] != nil {
			continue
		}
		n := &node{}
		switch op % 4 {
		case 0, 1:
			n.typ, n.exec = NarRegular, op%4 == 1
			size := int(next())
			if op&0x80 != 0 {
				size *= 97 // some files over 4 KiB
			}
			n.data = bytes.Repeat([]byte{byte(size), 'x'}, size/2+size%2)[:size]
		case 2:
			n.typ, n.target = NarSymlink, strings.Repeat("../", int(l%3))+name
		case 3:
			n.typ, n.children = NarDirectory, map[string]*node{}
			if len(dirs) < 30 {
				dirs = append(dirs, n)
			}
		}
		parent.children[name] = n
	}
	return root
}

// writeTree creates the tree on disk at p.
func writeTree(t testing.TB, p string, n *node) {
	var err error
	switch n.typ {
	case NarRegular:
		mode := os.FileMode(0o644)
		if n.exec {
			mode = 0o755
		}
		err = os.WriteFile(p, n.data, mode)
	case NarSymlink:
		err = os.Symlink(n.target, p)
	case NarDirectory:
		if err = os.Mkdir(p, 0o755); err == nil {
			for name, c := range n.children {
				writeTree(t, filepath.Join(p, name), c)
			}
		}
	}
	if err != nil {
		t.Fatal(err)
	}
}

// writeNar feeds the tree to a NarWriter in NAR order.
func writeNar(nw *NarWriter, rel string, n *node) error {
	switch n.typ {
	case NarRegular:
		if err := nw.WriteHeader(&NarHeader{Path: rel, Type: NarRegular, Executable: n.exec, Size: int64(len(n.data))}); err != nil {
			return err
		}
		// Write in uneven pieces.
		for d := n.data; len(d) > 0; {
			k := min(len(d), 1+len(d)/3)
			if _, err := nw.Write(d[:k]); err != nil {
				return err
			}
			d = d[k:]
		}
		return nil
	case NarSymlink:
		return nw.WriteHeader(&NarHeader{Path: rel, Type: NarSymlink, Linkname: n.target})
	}
	if err := nw.WriteHeader(&NarHeader{Path: rel, Type: NarDirectory}); err != nil {
		return err
	}
	names := make([]string, 0, len(n.children))
	for name := range n.children {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if err := writeNar(nw, path.Join(rel, name), n.children[name]); err != nil {
			return err
		}
	}
	return nil
}

// FuzzNarRoundTrip writes a tree to a temp dir and checks that DumpPath of it
// equals the NarWriter fed from memory, that the NAR decodes back to the same
// tree, and (when nix-store is installed) that it equals `nix-store --dump`.
func FuzzNarRoundTrip(f *testing.F) {
	f.Add([]byte{2, 0, 0, 1, 5, 0, 4, 1, 0, 0, 8, 2, 3, 1, 7, 3, 0, 9, 0, 0x81, 200, 77})
	f.Add([]byte{0, 1, 9})
	f.Add([]byte{1, 4})
	f.Add([]byte{2})
	nixStore, _ := testutil.LookTool("nix-store")
	f.Fuzz(func(t *testing.T, b []byte) {
		tree := treeFromBytes(b)
		p := filepath.Join(t.TempDir(), "root")
		writeTree(t, p, tree)
		var fromDisk, fromMem bytes.Buffer
		if err := DumpPath(&fromDisk, p); err != nil {
			t.Fatal(err)
		}
		nw := NewNarWriter(&fromMem)
		if err := writeNar(nw, "", tree); err != nil {
			t.Fatal(err)
		}
		if err := nw.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fromDisk.Bytes(), fromMem.Bytes()) {
			t.Fatalf("DumpPath and NarWriter differ (%d vs %d bytes)", fromDisk.Len(), fromMem.Len())
		}
		got, err := readNar(fromMem.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		if a, b := dumpNode(got), dumpNode(tree); a != b {
			t.Fatalf("round trip:\ngot  %s\nwant %s", a, b)
		}
		h, size, err := HashPath(p)
		if err != nil || size != uint64(fromMem.Len()) || h != "sha256:"+EncodeNix32(sha256Bytes(fromMem.Bytes())) {
			t.Fatalf("HashPath: got %s %d %v", h, size, err)
		}
		if nixStore != "" {
			want, err := exec.Command(nixStore, "--dump", p).Output()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(fromDisk.Bytes(), want) {
				t.Fatalf("DumpPath differs from nix-store --dump (%d vs %d bytes)", fromDisk.Len(), len(want))
			}
		}
	})
}

func dumpNode(n *node) string {
	switch n.typ {
	case NarRegular:
		return fmt.Sprintf("file(%v,%q)", n.exec, n.data)
	case NarSymlink:
		return fmt.Sprintf("link(%q)", n.target)
	}
	names := make([]string, 0, len(n.children))
	for name := range n.children {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString("dir(")
	for _, name := range names {
		fmt.Fprintf(&b, "%q:%s,", name, dumpNode(n.children[name]))
	}
	b.WriteString(")")
	return b.String()
}

// readNar is a small, strict NAR decoder for the tests, written from the
// format description rather than from NarWriter.
func readNar(b []byte) (*node, error) {
	r := bytes.NewReader(b)
	str := func() (string, error) {
		var n uint64
		if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
			return "", err
		}
		if n > uint64(r.Len()) {
			return "", io.ErrUnexpectedEOF
		}
		s := make([]byte, n)
		io.ReadFull(r, s)
		pad := make([]byte, (8-n%8)%8)
		io.ReadFull(r, pad)
		if !bytes.Equal(pad, make([]byte, len(pad))) {
			return "", errors.New("non-zero padding")
		}
		return string(s), nil
	}
	expect := func(want ...string) error {
		for _, w := range want {
			s, err := str()
			if err != nil {
				return err
			}
			if s != w {
				return fmt.Errorf("got %q, want %q", s, w)
			}
		}
		return nil
	}
	var parse func() (*node, error)
	parse = func() (*node, error) {
		if err := expect("(", "type"); err != nil {
			return nil, err
		}
		typ, err := str()
		if err != nil {
			return nil, err
		}
		n := &node{}
		switch typ {
		case "regular":
			n.typ = NarRegular
			s, err := str()
			if err != nil {
				return nil, err
			}
			if s == "executable" {
				n.exec = true
				if err := expect("", "contents"); err != nil {
					return nil, err
				}
			} else if s != "contents" {
				return nil, fmt.Errorf("got %q, want contents", s)
			}
			d, err := str()
			if err != nil {
				return nil, err
			}
			n.data = []byte(d)
		case "symlink":
			n.typ = NarSymlink
			if err := expect("target"); err != nil {
				return nil, err
			}
			if n.target, err = str(); err != nil {
				return nil, err
			}
		case "directory":
			n.typ, n.children = NarDirectory, map[string]*node{}
			last := ""
			for {
				s, err := str()
				if err != nil {
					return nil, err
				}
				if s == ")" {
					return n, nil
				}
				if s != "entry" {
					return nil, fmt.Errorf("got %q, want entry", s)
				}
				if err := expect("(", "name"); err != nil {
					return nil, err
				}
				name, err := str()
				if err != nil {
					return nil, err
				}
				if name <= last && last != "" {
					return nil, fmt.Errorf("entry %q after %q", name, last)
				}
				last = name
				if err := expect("node"); err != nil {
					return nil, err
				}
				c, err := parse()
				if err != nil {
					return nil, err
				}
				n.children[name] = c
				if err := expect(")"); err != nil {
					return nil, err
				}
			}
		default:
			return nil, fmt.Errorf("unknown type %q", typ)
		}
		return n, expect(")")
	}
	if err := expect("nix-archive-1"); err != nil {
		return nil, err
	}
	n, err := parse()
	if err != nil {
		return nil, err
	}
	if r.Len() != 0 {
		return nil, fmt.Errorf("%d trailing bytes", r.Len())
	}
	return n, nil
}
