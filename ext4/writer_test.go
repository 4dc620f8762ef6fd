package ext4

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// tfile is one entry of a test tree; regular files get generated content.
type tfile struct {
	h    Header
	seed byte
}

// content returns a file's data: mostly-zero blocks with a sprinkle of
// patterned ones, so that big files stay cheap and sparse.
func content(size int64, seed byte) io.Reader {
	return &genReader{size: size, seed: seed}
}

type genReader struct {
	off, size int64
	seed      byte
}

func (g *genReader) Read(p []byte) (int, error) {
	if g.off >= g.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), g.size-g.off)
	for i := int64(0); i < n; {
		o := g.off + i
		blk := o / blockSize
		end := min(n, (blk+1)*blockSize-g.off)
		if g.size > 1<<20 && blk%64 != 1 {
			clear(p[i:end])
			i = end
			continue
		}
		for ; i < end; i++ {
			p[i] = byte((g.off+i)*7+int64(g.seed)) ^ byte(blk)
		}
	}
	g.off += n
	return int(n), nil
}

func testOpts(size int64) Options {
	return Options{
		Size:     size,
		Label:    "nixos",
		UUID:     [16]byte{0x6e, 0x69, 0x78, 0x76, 0x6d, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11},
		HashSeed: [16]byte{9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6},
		Time:     1700000000,
	}
}

// build writes tree into a new sparse file of opts.Size and returns its
// path, or the first error.
func build(t testing.TB, tree []tfile, opts Options) (string, *Writer, error) {
	t.Helper()
	p, f := sparseFile(t, opts.Size)
	defer f.Close()
	w, err := NewWriter(f, opts)
	if err != nil {
		return p, nil, err
	}
	buf := make([]byte, 1<<20)
	for i := range tree {
		e := &tree[i]
		if err := w.WriteHeader(&e.h); err != nil {
			return p, w, err
		}
		if e.h.Type == TypeReg && e.h.Size > 0 {
			if _, err := io.CopyBuffer(w, content(e.h.Size, e.seed), buf); err != nil {
				return p, w, err
			}
		}
	}
	return p, w, w.Close()
}

// sparseFile creates fs.img, size bytes long, in a new temporary directory.
func sparseFile(t testing.TB, size int64) (string, *os.File) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		t.Fatal(err)
	}
	return p, f
}

// mountRO mounts img read-only on a new directory, unmounted at the end of
// the test; a failed mount skips the test.
func mountRO(t *testing.T, img string) string {
	t.Helper()
	testutil.NeedRoot(t)
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop,ro", img, mnt).CombinedOutput(); err != nil {
		testutil.Skip(t, "mount -o loop,ro %s: %v\n%s", img, err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

func mustBuild(t testing.TB, tree []tfile, opts Options) (string, *Writer) {
	t.Helper()
	p, w, err := build(t, tree, opts)
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	return p, w
}

const mt = 1600000000

func dir(name string, mode uint32) tfile {
	return tfile{h: Header{Name: name, Type: TypeDir, Mode: mode, Mtime: mt}}
}

func reg(name string, mode uint32, size int64, seed byte) tfile {
	return tfile{h: Header{Name: name, Type: TypeReg, Mode: mode, Size: size, Mtime: mt + int64(seed)}, seed: seed}
}

func symlink(name, target string) tfile {
	return tfile{h: Header{Name: name, Type: TypeSymlink, Linkname: target, Mtime: mt}}
}

func hardlink(name, target string) tfile {
	return tfile{h: Header{Name: name, Type: TypeLink, Linkname: target}}
}

// sampleTree covers every kind of entry; bigDir entries go into "many".
// With big, it has a 640 MiB file (an extent tree block).
func sampleTree(bigDir int, big bool) []tfile {
	tr := []tfile{
		{h: Header{Name: ".", Type: TypeDir, Mode: 0o755, Mtime: mt}},
		dir("etc", 0o755),
		reg("etc/empty", 0o644, 0, 1),
		reg("etc/small", 0o644, 5, 2),
		reg("etc/block", 0o600, 4096, 3),
		reg("etc/block1", 0o640, 4097, 4),
		reg("etc/mib", 0o644, 1<<20+123, 5),
		hardlink("etc/small-link", "etc/small"),
		hardlink("etc/small-link2", "etc/small"),
		symlink("etc/fast", "small"),
		symlink("etc/slow", strings.Repeat("long/", 30)+"target"),
		symlink("etc/slowest", strings.Repeat("x", 4000)),
		hardlink("etc/fast-link", "etc/fast"),
		dir("tmp", 0o1777),
		reg("tmp/suid", 0o4755, 100, 6),
		reg("tmp/sgid", 0o2755, 100, 7),
		{h: Header{Name: "tmp/owned", Type: TypeReg, Mode: 0o640, Uid: 1000, Gid: 100, Size: 10, Mtime: 4102444800}, seed: 8},
		{h: Header{Name: "tmp/bigid", Type: TypeReg, Mode: 0o644, Uid: 70000, Gid: 80000, Size: 1, Mtime: 0}, seed: 9},
		{h: Header{Name: "tmp/owned-dir", Type: TypeDir, Mode: 0o750, Uid: 1000, Gid: 100, Mtime: mt}},
		dir("nix", 0o755),
		dir("nix/store", 0o1775),
		dir("nix/store/abc-hello-1.0", 0o555),
		dir("nix/store/abc-hello-1.0/bin", 0o555),
		reg("nix/store/abc-hello-1.0/bin/hello", 0o555, 30000, 10),
		// Five or more extents: an extent tree block.
		dir("many", 0o755),
	}
	if big {
		tr = append(tr, reg("big", 0o644, 5*maxExtentLen*blockSize+777, 11))
	} else {
		tr = append(tr, reg("medium", 0o644, 20<<20+1, 11))
	}
	for i := 0; i < bigDir; i++ {
		name := fmt.Sprintf("many/%05d-%s", i, strings.Repeat("n", i%50))
		switch i % 7 {
		case 0:
			tr = append(tr, dir(name, 0o755))
		case 1:
			tr = append(tr, symlink(name, "../etc/small"))
		default:
			tr = append(tr, reg(name, 0o644, int64(i%300), byte(i)))
		}
	}
	return tr
}

// e2fsck runs e2fsck -fn and fails on a non-zero exit or any unexpected line.
func e2fsck(t testing.TB, img string) {
	t.Helper()
	bin := testutil.NeedTool(t, "e2fsck")[0]
	out, err := exec.Command(bin, "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("%s -fn %s: %v\n%s", bin, img, err, out)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		switch {
		case strings.HasPrefix(l, "e2fsck "), strings.HasPrefix(l, "Pass "),
			strings.Contains(l, " files (") && strings.Contains(l, " blocks"):
		default:
			t.Fatalf("e2fsck -fn %s: unexpected line %q in:\n%s", img, l, out)
		}
	}
}

// want is what a path must look like once the image is read back.
type want struct {
	mode     fs.FileMode
	uid, gid uint32
	mtime    int64
	size     int64
	sum      [32]byte
	target   string
	nlink    uint64
	linkOf   string // for hard links: the first name of the inode
}

func expected(tree []tfile) map[string]*want {
	m := map[string]*want{".": {mode: fs.ModeDir | 0o755, mtime: 1700000000, nlink: 3}} // 3: lost+found
	for _, e := range tree {
		h := e.h
		name := strings.TrimPrefix(h.Name, "./")
		switch h.Type {
		case TypeDir:
			if name == "." {
				r := m["."]
				r.mode, r.uid, r.gid, r.mtime = fs.ModeDir|perm(h.Mode), h.Uid, h.Gid, h.Mtime
				continue
			}
			m[name] = &want{mode: fs.ModeDir | perm(h.Mode), uid: h.Uid, gid: h.Gid, mtime: h.Mtime, nlink: 2}
			m[filepath.Dir(name)].nlink++
		case TypeReg:
			s := sha256.New()
			io.Copy(s, content(h.Size, e.seed))
			w := &want{mode: perm(h.Mode), uid: h.Uid, gid: h.Gid, mtime: h.Mtime, size: h.Size, nlink: 1}
			copy(w.sum[:], s.Sum(nil))
			m[name] = w
		case TypeSymlink:
			m[name] = &want{mode: fs.ModeSymlink | 0o777, uid: h.Uid, gid: h.Gid, mtime: h.Mtime, size: int64(len(h.Linkname)), target: h.Linkname, nlink: 1}
		case TypeLink:
			t := m[h.Linkname]
			for t.linkOf != "" {
				t = m[t.linkOf]
			}
			t.nlink++
			c := *t
			c.linkOf = h.Linkname
			m[name] = &c
		}
	}
	// Hard links share their target's final link count.
	for _, w := range m {
		if w.linkOf != "" {
			t := m[w.linkOf]
			for t.linkOf != "" {
				t = m[t.linkOf]
			}
			w.nlink = t.nlink
		}
	}
	return m
}

func perm(m uint32) fs.FileMode {
	p := fs.FileMode(m & 0o777)
	if m&0o4000 != 0 {
		p |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		p |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		p |= fs.ModeSticky
	}
	return p
}

// checkFlags says what the read-back can be trusted with: debugfs rdump
// drops setuid/setgid/sticky bits, owners (unless root) and hard links.
type checkFlags struct{ owner, nlink, mtime, dirMtime, special bool }

// compareTree walks root and compares it with tree.
func compareTree(t testing.TB, root string, tree []tfile, fl checkFlags) {
	t.Helper()
	m := expected(tree)
	seen := map[string]bool{}
	inos := map[string]uint64{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "lost+found" {
			return filepath.SkipDir
		}
		w, ok := m[rel]
		if !ok {
			t.Errorf("%s: unexpected entry", rel)
			return nil
		}
		seen[rel] = true
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		inos[rel] = st.Ino
		if gm, wm := fi.Mode(), w.mode; !fl.special {
			gm &^= fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky
			wm &^= fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky
			if gm != wm {
				t.Errorf("%s: mode: got %v, want %v", rel, gm, wm)
			}
		} else if fi.Mode() != w.mode {
			t.Errorf("%s: mode: got %v, want %v", rel, fi.Mode(), w.mode)
		}
		if fl.owner && (st.Uid != w.uid || st.Gid != w.gid) {
			t.Errorf("%s: owner: got %d:%d, want %d:%d", rel, st.Uid, st.Gid, w.uid, w.gid)
		}
		if fl.mtime && (fl.dirMtime || !fi.IsDir()) && fi.Mode()&fs.ModeSymlink == 0 && st.Mtim.Sec != w.mtime {
			t.Errorf("%s: mtime: got %d, want %d", rel, st.Mtim.Sec, w.mtime)
		}
		if fl.nlink && uint64(st.Nlink) != w.nlink {
			t.Errorf("%s: nlink: got %d, want %d", rel, st.Nlink, w.nlink)
		}
		switch {
		case fi.Mode().IsRegular():
			if fi.Size() != w.size {
				t.Errorf("%s: size: got %d, want %d", rel, fi.Size(), w.size)
			}
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			s := sha256.New()
			io.Copy(s, f)
			f.Close()
			if !bytes.Equal(s.Sum(nil), w.sum[:]) {
				t.Errorf("%s: content differs", rel)
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			got, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if got != w.target {
				t.Errorf("%s: symlink target: got %q, want %q", rel, got, w.target)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for n := range m {
		if !seen[n] {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("missing entries: %v", missing)
	}
	if fl.nlink {
		for n, w := range m {
			if w.linkOf != "" && inos[n] != inos[w.linkOf] {
				t.Errorf("%s: inode %d, want that of %s (%d)", n, inos[n], w.linkOf, inos[w.linkOf])
			}
		}
	}
}

// rdump extracts the image with debugfs, without root or mounting.
func rdump(t testing.TB, img string) string {
	t.Helper()
	bin := testutil.NeedTool(t, "debugfs")[0]
	out := t.TempDir()
	o, err := exec.Command(bin, "-R", "rdump / "+out, img).CombinedOutput()
	if err != nil {
		t.Fatalf("%s -R rdump: %v\n%s", bin, err, o)
	}
	return out
}

func TestWriterTree(t *testing.T) {
	tree := sampleTree(5000, true)
	opts := testOpts(1 << 30)
	img, _ := mustBuild(t, tree, opts)
	e2fsck(t, img)

	t.Run("dumpe2fs", func(t *testing.T) {
		bin := testutil.NeedTool(t, "dumpe2fs")[0]
		out, err := exec.Command(bin, "-h", img).CombinedOutput()
		if err != nil {
			t.Fatalf("dumpe2fs -h: %v\n%s", err, out)
		}
		fields := map[string]string{}
		for _, l := range strings.Split(string(out), "\n") {
			k, v, ok := strings.Cut(l, ":")
			if ok {
				fields[k] = strings.TrimSpace(v)
			}
		}
		for _, c := range []struct{ k, v string }{
			{"Filesystem volume name", "nixos"},
			{"Filesystem UUID", "6e697876-6d01-0203-0405-060708090a0b"},
			{"Filesystem features", "has_journal ext_attr dir_index filetype extent 64bit flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum"},
			{"Block size", "4096"},
			{"Inode size", "256"},
			{"Block count", "262144"},
			{"Reserved block count", "0"},
			{"Default directory hash", "half_md4"},
			{"Directory Hash Seed", "09080706-0504-0302-0100-010203040506"},
			{"Total journal size", "32M"},
			{"Total journal blocks", "8192"},
			{"Checksum type", "crc32c"},
			{"Filesystem created", "Tue Nov 14 22:13:20 2023"},
		} {
			if fields[c.k] != c.v {
				t.Errorf("dumpe2fs %s: got %q, want %q", c.k, fields[c.k], c.v)
			}
		}
	})
	t.Run("htree", func(t *testing.T) {
		bin := testutil.NeedTool(t, "debugfs")[0]
		out, err := exec.Command(bin, "-R", "htree many", img).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Root node dump:") {
			t.Fatalf("debugfs htree many: %v\n%s", err, out)
		}
	})
	t.Run("rdump", func(t *testing.T) {
		compareTree(t, rdump(t, img), tree, checkFlags{})
	})
	t.Run("mount", func(t *testing.T) {
		mnt := mountRO(t, img)
		compareTree(t, mnt, tree, checkFlags{owner: true, nlink: true, mtime: true, dirMtime: true, special: true})
	})
}

// TestMountReadWrite mounts read-write (the kernel replays nothing, checks
// descriptors and checksums), writes, unmounts and checks again.
func TestMountReadWrite(t *testing.T) {
	testutil.NeedRoot(t)
	tree := sampleTree(600, false)
	img, _ := mustBuild(t, tree, testOpts(1<<30))
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		testutil.Skip(t, "mount -o loop %s: %v\n%s", img, err, out)
	}
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	for i := 0; i < 200; i++ {
		if err := os.WriteFile(filepath.Join(mnt, "many", fmt.Sprintf("new-%d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(filepath.Join(mnt, "etc", "small-link")); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v\n%s", err, out)
	}
	mounted = false
	e2fsck(t, img)
}

func TestDeterministic(t *testing.T) {
	tree := sampleTree(3000, false)
	a, _ := mustBuild(t, tree, testOpts(256<<20))
	b, _ := mustBuild(t, tree, testOpts(256<<20))
	da, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(da, db) {
		t.Fatal("two builds of the same tree differ")
	}
	// A different seed must change the bytes: the test can fail.
	o := testOpts(256 << 20)
	o.HashSeed[0]++
	c, _ := mustBuild(t, tree, o)
	dc, _ := os.ReadFile(c)
	if bytes.Equal(da, dc) {
		t.Fatal("a different hash seed gave the same image")
	}
}

// TestSparse checks that unused inode tables, the journal body and zero
// file blocks are not written.
func TestSparse(t *testing.T) {
	img, _ := mustBuild(t, []tfile{reg("f", 0o644, 64<<20, 1)}, testOpts(1<<30))
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	allocated := fi.Sys().(*syscall.Stat_t).Blocks * 512
	// 64 MiB of mostly-zero data (1 block in 64 written), a 64 MiB journal.
	if allocated > 4<<20 {
		t.Fatalf("image allocates %d bytes on disk, want at most 4 MiB", allocated)
	}
	e2fsck(t, img)
}

func TestMinSize(t *testing.T) {
	small := sampleTree(400, false)
	_, w := mustBuild(t, small, testOpts(1<<30))
	u := w.Usage()
	size := MinSize(u)
	t.Logf("usage %+v: MinSize %d", u, size)
	img, w2 := mustBuild(t, small, testOpts(size))
	if got := w2.Usage(); got != u {
		t.Errorf("usage at MinSize: got %+v, want %+v", got, u)
	}
	e2fsck(t, img)
	if _, _, err := build(t, small, testOpts(size-blockSize)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("build at MinSize-4096: got %v, want ErrNoSpace", err)
	}
	// Inodes: a tree of many empty files is bounded by inodes, not blocks.
	var empties []tfile
	for i := 0; i < 3000; i++ {
		empties = append(empties, reg(fmt.Sprint(i), 0o644, 0, 0))
	}
	_, w = mustBuild(t, empties, testOpts(1<<30))
	u = w.Usage()
	size = MinSize(u)
	img, _ = mustBuild(t, empties, testOpts(size))
	e2fsck(t, img)
	if _, _, err := build(t, empties, testOpts(size-blockSize)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("empty files at MinSize-4096: got %v, want ErrNoSpace", err)
	}
}

func TestGrowResize2fs(t *testing.T) {
	bin := testutil.NeedTool(t, "resize2fs")[0]
	small := sampleTree(300, false)
	// 64 MiB fits one descriptor block before and after; 1 GiB -> 64 GiB
	// needs 8 descriptor blocks where there is 1 and no reserved ones.
	for _, size := range []int64{64 << 20, 1 << 30} {
		t.Run(fmt.Sprint(size>>20, "MiB"), func(t *testing.T) {
			img, _ := mustBuild(t, small, testOpts(size))
			if err := os.Truncate(img, 64*size); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(bin, img).CombinedOutput()
			if err != nil {
				t.Fatalf("%s %s: %v\n%s", bin, img, err, out)
			}
			if want := fmt.Sprintf("is now %d (4k) blocks long", 64*size/blockSize); !strings.Contains(string(out), want) {
				t.Fatalf("resize2fs did not grow to 64x (%q):\n%s", want, out)
			}
			e2fsck(t, img)
			compareTree(t, rdump(t, img), small, checkFlags{})
		})
	}
}

func TestErrors(t *testing.T) {
	newW := func(t *testing.T) *Writer {
		w, err := NewWriter(io.NewOffsetWriter(discard{}, 0), testOpts(64<<20))
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	for _, c := range []struct {
		name string
		hs   []Header
		want error
	}{
		{"missing parent", []Header{{Name: "a/b", Type: TypeReg}}, ErrNotExist},
		{"duplicate", []Header{{Name: "a", Type: TypeDir}, {Name: "a", Type: TypeReg}}, ErrExist},
		{"parent not dir", []Header{{Name: "a", Type: TypeReg}, {Name: "a/b", Type: TypeReg}}, ErrNotDir},
		{"link target missing", []Header{{Name: "a", Type: TypeLink, Linkname: "b"}}, ErrNotExist},
		{"link to dir", []Header{{Name: "a", Type: TypeDir}, {Name: "b", Type: TypeLink, Linkname: "a"}}, ErrInvalidHeader},
		{"escapes root", []Header{{Name: "../a", Type: TypeReg}}, ErrInvalidHeader},
		{"bad mode", []Header{{Name: "a", Type: TypeReg, Mode: 0o10644}}, ErrInvalidHeader},
		{"empty symlink", []Header{{Name: "a", Type: TypeSymlink}}, ErrInvalidHeader},
		{"missing data", []Header{{Name: "a", Type: TypeReg, Size: 10}, {Name: "b", Type: TypeReg}}, ErrMissingData},
		{"too big", []Header{{Name: "a", Type: TypeReg, Size: 1 << 30}}, ErrNoSpace},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := newW(t)
			var err error
			for i := range c.hs {
				if err = w.WriteHeader(&c.hs[i]); err != nil {
					break
				}
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			// Sticky.
			if err2 := w.WriteHeader(&Header{Name: "zzz", Type: TypeDir}); !errors.Is(err2, c.want) {
				t.Fatalf("after error: got %v, want %v", err2, c.want)
			}
			if err2 := w.Close(); !errors.Is(err2, c.want) {
				t.Fatalf("Close after error: got %v, want %v", err2, c.want)
			}
			if err2 := w.WriteHeader(&Header{Name: "zzz", Type: TypeDir}); !errors.Is(err2, ErrWriteAfterClose) {
				t.Fatalf("after Close: got %v, want ErrWriteAfterClose", err2)
			}
		})
	}
	t.Run("write too long", func(t *testing.T) {
		w := newW(t)
		if err := w.WriteHeader(&Header{Name: "a", Type: TypeReg, Size: 3}); err != nil {
			t.Fatal(err)
		}
		if n, err := w.Write([]byte("abcd")); n != 3 || !errors.Is(err, ErrWriteTooLong) {
			t.Fatalf("got %d, %v, want 3, ErrWriteTooLong", n, err)
		}
	})
	t.Run("inodes exhausted", func(t *testing.T) {
		o := testOpts(64 << 20)
		o.Inodes = 16
		w, err := NewWriter(io.NewOffsetWriter(discard{}, 0), o)
		if err != nil {
			t.Fatal(err)
		}
		var last error
		for i := 0; i < 10 && last == nil; i++ {
			last = w.WriteHeader(&Header{Name: fmt.Sprint(i), Type: TypeReg})
		}
		if !errors.Is(last, ErrNoSpace) || !strings.Contains(last.Error(), "inode") {
			t.Fatalf("got %v, want ErrNoSpace for inodes", last)
		}
	})
	t.Run("options", func(t *testing.T) {
		for _, o := range []Options{{}, {Size: 1 << 20}, {Size: 64 << 20, Label: strings.Repeat("x", 17)}} {
			if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("Validate(%+v): got %v, want ErrInvalidOptions", o, err)
			}
		}
	})
}

type discard struct{}

func (discard) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
