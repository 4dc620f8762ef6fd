package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
)

// newBuilder returns a builder of o as Build makes it, cleaned up when the
// test ends.
func newBuilder(t *testing.T, o Options) *builder {
	t.Helper()
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	b := &builder{opts: o, ctx: context.Background()}
	t.Cleanup(func() {
		if err := b.cleanup(); err != nil {
			t.Error(err)
		}
	})
	return b
}

// TestScanStore: the scan phase reads every store path's tree in NAR order,
// with executable bits, symlink targets and hard links, and counts each
// inode's bytes once.
func TestScanStore(t *testing.T) {
	s := makeStore(t, smallSpecs())
	b := newBuilder(t, s.opts(t, filepath.Join(t.TempDir(), "out")))
	if err := b.scanStore(); err != nil {
		t.Fatal(err)
	}
	if b.scan.files != 6 {
		t.Errorf("files: got %d, want 6 (the hard link counted once)", b.scan.files)
	}
	var want int64
	for _, sp := range smallSpecs() {
		for _, e := range sp.entries {
			want += int64(len(e.data))
		}
	}
	if b.scan.bytes != want {
		t.Errorf("bytes: got %d, want %d", b.scan.bytes, want)
	}
	got := map[string]string{}
	for i, p := range s.closure.Paths {
		err := walk(b.trees[i], "", func(n *node, rel string) error {
			desc := [...]string{kindReg: "reg", kindDir: "dir", kindSymlink: "link"}[n.kind]
			switch {
			case n.exec:
				desc += " exec"
			case n.first != nil:
				desc += " hardlink to " + imagePath(n.first)
			case n.target != "":
				desc += " -> " + n.target
			}
			got[path.Join(path.Base(p.Path)[33:], rel)] = desc
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Of two names for one inode, the first in closure (sorted) order owns
	// it; the other is the hard link.
	owner, link := "lib-1.0/share/data", "optimised/data"
	if s.byName["optimised"] < s.byName["lib-1.0"] {
		owner, link = link, owner
	}
	ownerPath := strings.TrimPrefix(s.byName[strings.SplitN(owner, "/", 2)[0]], "/") + "/" + strings.SplitN(owner, "/", 2)[1]
	for name, want := range map[string]string{
		"lib-1.0":                     "dir",
		"lib-1.0/lib/libfoo.so":       "reg exec",
		"lib-1.0/lib/libfoo.so.1":     "link -> libfoo.so",
		"lib-1.0/share/empty-dir":     "dir",
		owner:                         "reg",
		link:                          "reg hardlink to " + ownerPath,
		"nixos-system-test/sw/bin/sh": "link -> " + s.byName["bash-5.2"] + "/bin/sh",
	} {
		if got[name] != want {
			t.Errorf("%s: got %q, want %q", name, got[name], want)
		}
	}
	if len(got) != 20 {
		t.Errorf("scanned %d entries, want 20: %v", len(got), got)
	}
}

// TestScanStoreErrors: a missing path wraps ErrMissing and ENOENT; a
// cancelled build stops before reading anything.
func TestScanStoreErrors(t *testing.T) {
	s := makeStore(t, smallSpecs())
	o := s.opts(t, filepath.Join(t.TempDir(), "out"))
	b := newBuilder(t, o)
	if err := os.RemoveAll(s.byName["optimised"]); err != nil {
		t.Fatal(err)
	}
	if err := b.scanStore(); !errors.Is(err, ErrMissing) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing path: got %v, want ErrMissing and ErrNotExist", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b = newBuilder(t, o)
	b.ctx = ctx
	if err := b.scanStore(); !errors.Is(err, context.Canceled) || b.trees != nil {
		t.Errorf("cancelled: got %v and %d trees, want context.Canceled and none", err, len(b.trees))
	}
}

// TestPlanDisk: an automatic plan holds the closure, a tenth more and the
// headroom; an explicit size gives the largest root that fits it; too small
// a size is a SizeError with the smallest disk that fits.
func TestPlanDisk(t *testing.T) {
	s := makeStore(t, smallSpecs())
	plan := func(layout partition.Layout, size int64) (*partition.Plan, int64, error) {
		o := s.opts(t, filepath.Join(t.TempDir(), "out"))
		o.Layout, o.Size = layout, size
		b := newBuilder(t, o)
		if err := b.scanStore(); err != nil {
			t.Fatal(err)
		}
		u, err := b.usage()
		if err != nil {
			t.Fatal(err)
		}
		p, err := b.planDisk()
		return p, ext4.MinSize(u), err
	}
	for _, layout := range partition.Layouts {
		auto, minFS, err := plan(layout, 0)
		if err != nil {
			t.Fatalf("%s auto: %v", layout, err)
		}
		if want := minFS + minFS/10 + headroom; auto.Root.Size < want || auto.Root.Size >= want+partition.MiB {
			t.Errorf("%s auto: root %d bytes, want %d rounded up to a MiB", layout, auto.Root.Size, want)
		}
		if layout.HasESP() != (auto.ESP.Size == partition.DefaultESPSize) {
			t.Errorf("%s auto: ESP %+v", layout, auto.ESP)
		}
		sized, _, err := plan(layout, 3<<30)
		if err != nil {
			t.Fatalf("%s 3 GiB: %v", layout, err)
		}
		bigger, err := partition.NewPlan(layout, sized.Root.Size+partition.MiB, 0)
		if err != nil || sized.DiskSize > 3<<30 || bigger.DiskSize <= 3<<30 {
			t.Errorf("%s 3 GiB: disk %d, root %d: not the largest root that fits", layout, sized.DiskSize, sized.Root.Size)
		}
		_, _, err = plan(layout, 4<<20)
		var se *SizeError
		minPlan, _ := partition.NewPlan(layout, minFS, 0)
		if !errors.As(err, &se) || !errors.Is(err, ErrTooSmall) || se.Size != 4<<20 || se.Min != minPlan.DiskSize {
			t.Errorf("%s 4 MiB: got %v, want a SizeError with Min %d", layout, err, minPlan.DiskSize)
		}
	}
}

// buildRaw runs the phases up to the raw disk and returns the builder, the
// plan and the raw disk.
func buildRaw(t *testing.T, o Options) (*builder, *partition.Plan, *os.File) {
	t.Helper()
	b := newBuilder(t, o)
	if err := b.loadPrevious(); err != nil {
		t.Fatal(err)
	}
	if err := b.scanStore(); err != nil {
		t.Fatal(err)
	}
	plan, err := b.planDisk()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.writeRawDisk(plan)
	if err != nil {
		t.Fatal(err)
	}
	return b, plan, raw
}

// TestWriteRawDisk: the raw disk's root file system passes e2fsck, and the
// layout map names a unit for every store path and every file outside the
// store, with no block in two units.
func TestWriteRawDisk(t *testing.T) {
	s := makeStore(t, smallSpecs())
	b, plan, raw := buildRaw(t, s.opts(t, filepath.Join(t.TempDir(), "out")))
	e2fsckRoot(t, raw.Name(), plan)
	if b.layout.RootOffset != plan.Root.Start || b.layout.RootSize != plan.Root.Size {
		t.Errorf("layout map: root at %d, %d bytes; want %d, %d", b.layout.RootOffset, b.layout.RootSize, plan.Root.Start, plan.Root.Size)
	}
	units := map[string]bool{}
	owner := map[int64]string{}
	for _, u := range b.layout.Units {
		units[u.Name] = true
		for _, r := range u.Blocks {
			for blk := r.Start; blk < r.Start+r.Len; blk++ {
				if o, ok := owner[int64(blk)]; ok {
					t.Fatalf("block %d is in units %q and %q", blk, o, u.Name)
				}
				owner[int64(blk)] = u.Name
			}
		}
	}
	want := []string{"", "/nix/var/nix/db/db.sqlite", "/nix/var/nix/profiles/system", "/etc/NIXOS", "/bin/sh"}
	for _, p := range s.closure.Paths {
		want = append(want, path.Base(p.Path))
	}
	for _, w := range want {
		if !units[w] {
			t.Errorf("the layout map has no unit %q", w)
		}
	}
}

// TestVMStageHook: the hook runs on the raw disk after the root file system
// is written and before packing, so what it writes is in the output.
func TestVMStageHook(t *testing.T) {
	s := makeStore(t, smallSpecs())
	dir := t.TempDir()
	marker := bytes.Repeat([]byte("boot loader "), 4096/12+1)[:4096]
	o := s.opts(t, filepath.Join(dir, "out.raw"))
	o.Format = FormatRaw
	o.Bootloader = func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
		// The root file system is there: its superblock's magic.
		var magic [2]byte
		if _, err := raw.ReadAt(magic[:], plan.Root.Start+1024+0x38); err != nil || magic != [2]byte{0x53, 0xef} {
			t.Errorf("the hook ran before the root file system was written (%v, magic %x)", err, magic)
		}
		_, err := raw.WriteAt(marker, 64<<10) // in the gap before the first partition
		return err
	}
	res := mustBuild(t, o)
	got := make([]byte, len(marker))
	f, err := os.Open(o.Output)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, marker) {
		t.Errorf("the hook's write is not in the output (%v)", err)
	}
	m := readManifest(t, ManifestPath(o.Output))
	if m.Blocks[(64<<10)/manifest.BlockSize] != manifest.HashBlock(marker) || m.Digest != res.Digest {
		t.Errorf("the manifest does not hash the hook's write")
	}
}

// sparseRaw writes a sparse file of size bytes with data at the given
// offsets (zeros included: a written zero block is data, not a hole).
func sparseRaw(t *testing.T, size int64, data map[int64][]byte) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range data {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// packBuilder returns a builder for the last phases (pack, publish), which
// need no closure: o with Output, Format and Workers set.
func packBuilder(t *testing.T, ctx context.Context, o Options) *builder {
	t.Helper()
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	o.Log = logWriter{t}
	b := &builder{opts: o, ctx: ctx}
	t.Cleanup(func() {
		if err := b.cleanup(); err != nil {
			t.Error(err)
		}
	})
	return b
}

type countProgress struct {
	phases []string
	total  int64
	added  int64
}

func (c *countProgress) Phase(name string, total int64) {
	c.phases = append(c.phases, name)
	c.total = total
}
func (c *countProgress) Add(n int64) { c.added += n }

// TestPack packs a sparse raw disk with data at unaligned offsets, a
// written all-zero region and a tail short of a block: the qcow2 reads back
// as the raw disk (qemu-img compare), the manifest hashes every block, and
// progress adds up to the disk size.
func TestPack(t *testing.T) {
	const size = 64<<20 + 4096
	data := map[int64][]byte{
		0:                       bytes.Repeat([]byte{1}, 100),
		5<<20 + 7:               bytes.Repeat([]byte("x"), 10<<20),
		20 << 20:                make([]byte, 1<<20), // written zeros
		size - 4096:             bytes.Repeat([]byte{2}, 4096),
		33<<20 + chunkSize - 10: []byte("across a chunk boundary"),
	}
	raw := sparseRaw(t, size, data)
	for _, format := range []Format{FormatQcow2, FormatRaw} {
		t.Run(string(format), func(t *testing.T) {
			dir := t.TempDir()
			pr := &countProgress{}
			b := packBuilder(t, context.Background(), Options{Output: filepath.Join(dir, "out"), Format: format, Workers: 2, Progress: pr})
			img, err := b.pack(raw, &partition.Plan{DiskSize: size})
			if err != nil {
				t.Fatal(err)
			}
			if pr.total != size || pr.added != size || len(pr.phases) != 1 || pr.phases[0] != "pack "+string(format) {
				t.Errorf("progress: phases %v, total %d, added %d; want one pack phase of %d", pr.phases, pr.total, pr.added, size)
			}
			want := make([]byte, size)
			for off, b := range data {
				copy(want[off:], b)
			}
			for i := int64(0); i < size/manifest.BlockSize; i++ {
				blk := want[i*manifest.BlockSize : (i+1)*manifest.BlockSize]
				if got := img.manifest.Blocks[i]; got != manifest.HashBlock(blk) {
					t.Fatalf("manifest block %d: got %x, want the block's hash", i, got)
				}
			}
			if format == FormatRaw {
				if img.file != raw {
					t.Errorf("raw format: the packed file is not the raw disk")
				}
				return
			}
			qemuImgCheck(t, img.file.Name())
			qemuImgCompare(t, img.file.Name(), raw.Name())
		})
	}
}

// TestPackCancel: a cancelled pack stops with the context's error.
func TestPackCancel(t *testing.T) {
	raw := sparseRaw(t, 8<<20, map[int64][]byte{0: []byte("data")})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b := packBuilder(t, ctx, Options{Output: filepath.Join(t.TempDir(), "out"), Format: FormatQcow2, Workers: 1})
	if _, err := b.pack(raw, &partition.Plan{DiskSize: 8 << 20}); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}

// TestPublish: publishing replaces an old output and manifest, leaves no
// temporary file and makes both 0644; when the old manifest cannot be
// removed, the old output stays and the error says so.
func TestPublish(t *testing.T) {
	pack := func(t *testing.T, out string) (*builder, *packed) {
		raw := sparseRaw(t, 1<<20, map[int64][]byte{4096: []byte("new image")})
		b := packBuilder(t, context.Background(), Options{Output: out, Format: FormatQcow2, Workers: 1})
		img, err := b.pack(raw, &partition.Plan{DiskSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return b, img
	}
	t.Run("replace", func(t *testing.T) {
		dir := t.TempDir()
		out := filepath.Join(dir, "img.qcow2")
		os.WriteFile(out, []byte("old"), 0o600)
		os.WriteFile(ManifestPath(out), []byte("old"), 0o600)
		b, img := pack(t, out)
		if err := b.publish(img); err != nil {
			t.Fatal(err)
		}
		if got := dirNames(t, dir); got != "img.qcow2,img.qcow2.manifest" {
			t.Errorf("directory holds %s", got)
		}
		for _, p := range []string{out, ManifestPath(out)} {
			if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o644 {
				t.Errorf("%s: %v %v, want mode 0644", p, fi.Mode(), err)
			}
		}
		if m := readManifest(t, ManifestPath(out)); m.Digest != img.manifest.Digest {
			t.Errorf("published manifest digest %x, want %x", m.Digest, img.manifest.Digest)
		}
		qemuImgCheck(t, out)
	})
	t.Run("old manifest stuck", func(t *testing.T) {
		dir := t.TempDir()
		out := filepath.Join(dir, "img.qcow2")
		os.WriteFile(out, []byte("old"), 0o600)
		os.MkdirAll(filepath.Join(ManifestPath(out), "x"), 0o755) // a non-empty directory
		b, img := pack(t, out)
		err := b.publish(img)
		if err == nil || !strings.Contains(err.Error(), "old manifest") {
			t.Errorf("got %v, want an error about the old manifest", err)
		}
		if b, _ := os.ReadFile(out); string(b) != "old" {
			t.Errorf("the old output was replaced")
		}
	})
}
