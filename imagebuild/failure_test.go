package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// cancelAt is a Progress that cancels the build when the named phase
// starts.
type cancelAt struct {
	phase  string
	cancel context.CancelFunc
	seen   []string
}

func (c *cancelAt) Phase(name string, total int64) {
	c.seen = append(c.seen, name)
	if name == c.phase {
		c.cancel()
	}
}

func (c *cancelAt) Add(int64) {}

// TestBuildCancel cancels the build in each phase: the error is the
// context's and nothing is left beside the output, not even with an old
// output being replaced, which stays as it was.
func TestBuildCancel(t *testing.T) {
	s := makeStore(t, smallSpecs())
	for _, phase := range []string{"start", "write store", "bootloader", "pack qcow2"} {
		t.Run(phase, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "out.qcow2")
			os.WriteFile(out, []byte("old image"), 0o644)
			os.WriteFile(ManifestPath(out), []byte("old manifest"), 0o644)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			o := s.opts(t, out)
			o.Force = true
			pr := &cancelAt{phase: phase, cancel: cancel}
			o.Progress = pr
			ran := false
			o.Bootloader = func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
				ran = true
				if phase == "bootloader" {
					cancel()
				}
				return ctx.Err()
			}
			if phase == "start" {
				cancel()
			}
			_, err := Build(ctx, o)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("got %v, want context.Canceled (phases seen: %v)", err, pr.seen)
			}
			if phase == "pack qcow2" && !ran {
				t.Errorf("cancelled in %s before the boot loader hook ran", phase)
			}
			if got := dirNames(t, dir); got != "out.qcow2,out.qcow2.manifest" {
				t.Errorf("left %s, want the old output only", got)
			}
			if b, _ := os.ReadFile(out); string(b) != "old image" {
				t.Errorf("the old output was touched")
			}
			if b, _ := os.ReadFile(ManifestPath(out)); string(b) != "old manifest" {
				t.Errorf("the old manifest was touched")
			}
		})
	}
}

// mountTmpfs mounts a tmpfs of size bytes on a new directory, unmounted
// when the test ends.
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	testutil.NeedRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput(); err != nil {
		testutil.Skip(t, "mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// allocated is the bytes a file takes on disk.
func allocated(t *testing.T, name string) int64 {
	t.Helper()
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestBuildDiskFull builds onto a file system too small for the raw disk,
// and onto one that holds the raw disk but not the qcow2 beside it: the
// error is ENOSPC, the space is given back and an old output survives.
func TestBuildDiskFull(t *testing.T) {
	s := makeStore(t, smallSpecs())
	// What the raw disk takes: the build writes it beside the output.
	probe := s.opts(t, filepath.Join(t.TempDir(), "probe.raw"))
	probe.Format = FormatRaw
	mustBuild(t, probe)
	rawBytes := allocated(t, probe.Output)
	t.Logf("the raw disk takes %d KiB", rawBytes>>10)

	for _, tc := range []struct {
		name string
		size int64
	}{
		{"raw disk", rawBytes / 2},
		{"qcow2", rawBytes + rawBytes/4}, // uncompressed qcow2 is about as big
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := mountTmpfs(t, tc.size)
			out := filepath.Join(dir, "out.qcow2")
			os.WriteFile(out, []byte("old image"), 0o644)
			o := s.opts(t, out)
			o.Force, o.Compression = true, qcow.None
			_, err := Build(context.Background(), o)
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("got %v, want ENOSPC", err)
			}
			if got := dirNames(t, dir); got != "out.qcow2" {
				t.Errorf("left %s, want the old output only", got)
			}
			if b, _ := os.ReadFile(out); string(b) != "old image" {
				t.Errorf("the old output was touched")
			}
			var st syscall.Statfs_t
			if err := syscall.Statfs(dir, &st); err != nil {
				t.Fatal(err)
			}
			if used := int64(st.Blocks-st.Bfree) * st.Bsize; used > 64<<10 {
				t.Errorf("%d KiB still used on the file system after the failure", used>>10)
			}
		})
	}
}

// TestBuildBadPrevious: a previous image or manifest that cannot be read
// fails the build with ErrPrevious, naming it; nothing is written.
func TestBuildBadPrevious(t *testing.T) {
	s := makeStore(t, smallSpecs())
	prevDir := t.TempDir()
	good := filepath.Join(prevDir, "good.qcow2")
	mustBuild(t, s.opts(t, good))
	goodRaw := filepath.Join(prevDir, "good.raw")
	o := s.opts(t, goodRaw)
	o.Format = FormatRaw
	mustBuild(t, o)
	img, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	man, err := os.ReadFile(ManifestPath(good))
	if err != nil {
		t.Fatal(err)
	}
	flip := func(b []byte, at int) []byte {
		b = bytes.Clone(b)
		b[at] ^= 0xff
		return b
	}
	for _, tc := range []struct {
		name  string
		files map[string][]byte // written into a directory of their own
		prev  string            // the file passed as Previous
	}{
		{"truncated qcow2", map[string][]byte{"p.qcow2": img[:len(img)/2]}, "p.qcow2"},
		{"qcow2 header only", map[string][]byte{"p.qcow2": img[:512]}, "p.qcow2"},
		{"not an image", map[string][]byte{"p.qcow2": []byte("hello, world\n")}, "p.qcow2"},
		{"damaged manifest", map[string][]byte{"p.manifest": flip(man, len(man)/2)}, "p.manifest"},
		{"truncated manifest", map[string][]byte{"p.manifest": man[:len(man)/3]}, "p.manifest"},
		{"damaged manifest beside the image", map[string][]byte{"p.qcow2": img, "p.qcow2.manifest": flip(man, 100)}, "p.qcow2"},
		{"missing", nil, "nothing.qcow2"},
		{"raw without a superblock", nil, "noext4.raw"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pdir := t.TempDir()
			for name, data := range tc.files {
				if err := os.WriteFile(filepath.Join(pdir, name), data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tc.prev == "noext4.raw" {
				damageSuperblock(t, goodRaw, filepath.Join(pdir, tc.prev))
			}
			dir := t.TempDir()
			o := s.opts(t, filepath.Join(dir, "out.qcow2"))
			o.Previous = filepath.Join(pdir, tc.prev)
			_, err := Build(context.Background(), o)
			if !errors.Is(err, ErrPrevious) || !strings.Contains(err.Error(), filepath.Join(pdir, tc.prev)) {
				t.Errorf("got %v, want ErrPrevious naming %s", err, o.Previous)
			}
			if got := dirNames(t, dir); got != "" {
				t.Errorf("left %s", got)
			}
		})
	}
}

// TestBuildPreviousImageOnly: a previous zstd qcow2 without its manifest is
// read through its own file system (go-qcow2reader with the zstd codec this
// package registers itself), and the rebuild equals one that had the
// manifest.
func TestBuildPreviousImageOnly(t *testing.T) {
	s := makeStore(t, smallSpecs())
	dir := t.TempDir()
	prev := filepath.Join(dir, "prev.qcow2")
	mustBuild(t, s.opts(t, prev))
	alone := filepath.Join(t.TempDir(), "alone.qcow2")
	testutil.Run(t, "cp", prev, alone)

	withManifest := filepath.Join(dir, "a.qcow2")
	o := s.opts(t, withManifest)
	o.Previous = prev
	mustBuild(t, o)
	var log bytes.Buffer
	fromImage := filepath.Join(dir, "b.qcow2")
	o = s.opts(t, fromImage)
	o.Previous, o.Log = alone, &log
	mustBuild(t, o)
	if !strings.Contains(log.String(), "read from the file system of "+alone) {
		t.Errorf("log does not say the layout came from the image:\n%s", log.String())
	}
	if testutil.SHA256File(t, withManifest) != testutil.SHA256File(t, fromImage) {
		t.Errorf("the rebuild with the previous layout read from the image differs from the one read from its manifest")
	}
}

// damageSuperblock copies the raw disk src to dst (sparse) with the root
// file system's superblock zeroed.
func damageSuperblock(t *testing.T, src, dst string) {
	t.Helper()
	testutil.Run(t, "cp", "--sparse=always", src, dst)
	plan := rawPlan(t, partition.Legacy, dst)
	f, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 1024), plan.Root.Start+1024); err != nil {
		t.Fatal(err)
	}
}

// TestBuildPreviousNotUsable: a previous image whose layout does not fit
// (another partition layout) is set aside with a note in the log, and the
// output is what a build without it writes.
func TestBuildPreviousNotUsable(t *testing.T) {
	s := makeStore(t, smallSpecs())
	dir := t.TempDir()
	efi := filepath.Join(dir, "efi.qcow2")
	o := s.opts(t, efi)
	o.Layout = partition.EFI
	mustBuild(t, o)

	fresh := filepath.Join(dir, "fresh.qcow2")
	mustBuild(t, s.opts(t, fresh))
	var log bytes.Buffer
	kept := filepath.Join(dir, "kept.qcow2")
	o = s.opts(t, kept)
	o.Previous, o.Log = efi, &log
	mustBuild(t, o)
	if !strings.Contains(log.String(), "previous layout not used") {
		t.Errorf("log does not say why the previous layout was not used:\n%s", log.String())
	}
	if a, b := testutil.SHA256File(t, fresh), testutil.SHA256File(t, kept); a != b {
		t.Errorf("build with an unusable previous layout differs from a fresh build")
	}
}
