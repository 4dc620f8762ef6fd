package imagebuild

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestBuild builds the tiny closure as qcow2 and raw in two layouts and
// checks the outputs with qemu-img and e2fsck, the manifests against each
// other and the image's store against the host's.
func TestBuild(t *testing.T) {
	s := makeStore(t, smallSpecs())
	for _, layout := range []partition.Layout{partition.Legacy, partition.EFI} {
		t.Run(string(layout), func(t *testing.T) {
			dir := t.TempDir()
			img, raw := filepath.Join(dir, "img.qcow2"), filepath.Join(dir, "img.raw")
			o := s.opts(t, img)
			o.Layout = layout
			res := mustBuild(t, o)
			o.Output, o.Format = raw, FormatRaw
			resRaw := mustBuild(t, o)

			if got := dirNames(t, dir); got != "img.qcow2,img.qcow2.manifest,img.raw,img.raw.manifest" {
				t.Errorf("output directory holds %s, want the images and manifests only", got)
			}
			if res.Paths != 4 || res.Files != 6 || res.NarBytes != resRaw.NarBytes || res.DiskSize != resRaw.DiskSize {
				t.Errorf("results: qcow2 %+v, raw %+v; want 4 paths, 6 files (one hard link), equal sizes", res, resRaw)
			}
			if res.Digest != resRaw.Digest {
				t.Errorf("manifest digests differ: qcow2 %x, raw %x", res.Digest, resRaw.Digest)
			}
			for _, p := range []string{img, raw, img + ".manifest"} {
				if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o644 {
					t.Errorf("%s: %v, want mode 0644", p, fi.Mode())
				}
			}
			m := readManifest(t, ManifestPath(img))
			if m.VirtualSize != res.DiskSize || m.Digest != res.Digest || m.Layout == nil {
				t.Errorf("manifest: size %d digest %x layout %v, want %d %x and a layout map", m.VirtualSize, m.Digest, m.Layout != nil, res.DiskSize, res.Digest)
			}
			qemuImgCheck(t, img)
			qemuImgCompare(t, img, raw)
			plan := rawPlan(t, layout, raw)
			e2fsckRoot(t, raw, plan)
			checkImageStore(t, s, raw, plan)
		})
	}
}

// checkImageStore mounts the root file system of raw and compares every
// store path's NAR with the host's, and the links NixOS needs.
func checkImageStore(t *testing.T, s *testStore, raw string, plan *partition.Plan) {
	t.Helper()
	mnt := t.TempDir()
	dev := testutil.AttachLoop(t, raw, plan.Root.Start, plan.Root.Size)
	testutil.Mount(t, dev, mnt, "ro")
	for _, p := range s.closure.Paths {
		want, _, err := nixclosure.HashPath(p.Path)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := nixclosure.HashPath(mnt + p.Path)
		if err != nil || got != want {
			t.Errorf("%s: NAR hash in the image %s (%v), want %s", p.Path, got, err, want)
		}
	}
	links := map[string]string{
		"nix/var/nix/profiles/system":        "system-1-link",
		"nix/var/nix/profiles/system-1-link": s.toplevel,
		"bin/sh":                             s.byName["bash-5.2"] + "/bin/bash",
	}
	for name, want := range links {
		if got, err := os.Readlink(filepath.Join(mnt, name)); got != want {
			t.Errorf("/%s -> %q (%v), want %q", name, got, err, want)
		}
	}
	a, errA := os.Stat(mnt + s.byName["lib-1.0"] + "/share/data")
	b, errB := os.Stat(mnt + s.byName["optimised"] + "/data")
	if errA != nil || errB != nil || !os.SameFile(a, b) {
		t.Errorf("the hard link between two store paths was not kept (%v, %v)", errA, errB)
	}
	for _, f := range []string{"nix/var/nix/db/db.sqlite", "nix/var/nix/db/schema", "etc/NIXOS"} {
		if _, err := os.Stat(filepath.Join(mnt, f)); err != nil {
			t.Error(err)
		}
	}
}

// TestBuildWorkers: the output does not depend on the number of workers.
func TestBuildWorkers(t *testing.T) {
	s := makeStore(t, smallSpecs())
	dir := t.TempDir()
	var sums []string
	for _, w := range []int{1, 3} {
		o := s.opts(t, filepath.Join(dir, "img"+string(rune('0'+w))))
		o.Workers = w
		mustBuild(t, o)
		sums = append(sums, testutil.SHA256File(t, o.Output), testutil.SHA256File(t, ManifestPath(o.Output)))
	}
	if sums[0] != sums[2] || sums[1] != sums[3] {
		t.Errorf("1 and 3 workers give different outputs: %v", sums)
	}
}

// TestBuildPrevious rebuilds with one store path changed and the first
// image as the previous one: unchanged paths keep their blocks.
func TestBuildPrevious(t *testing.T) {
	s1 := makeStore(t, smallSpecs())
	specs := smallSpecs()
	specs[1].name, specs[1].entries[2].data = "bash-5.3", "#!/bin/false\n"+text("bash 5.3", 50<<10)
	specs[3].refs[0] = "bash-5.3"
	specs[3].entries[3].symlink = "@bash-5.3/bin/sh"
	specs[3].name = "nixos-system-test-2"
	// Generation 2: the same store with bash 5.3 and a new toplevel.
	gen2 := makeStore(t, specs)

	dir := t.TempDir()
	g1 := filepath.Join(dir, "g1.raw")
	o := s1.opts(t, g1)
	o.Format = FormatRaw
	mustBuild(t, o)

	g2 := filepath.Join(dir, "g2.raw")
	o = gen2.opts(t, g2)
	o.Format, o.Previous = FormatRaw, g1
	mustBuild(t, o)
	m1, m2 := readManifest(t, ManifestPath(g1)), readManifest(t, ManifestPath(g2))
	if m1.VirtualSize != m2.VirtualSize || m1.Layout.Lineage != m2.Layout.Lineage || m1.Layout.UUID != m2.Layout.UUID {
		t.Errorf("generation 2 did not keep generation 1's disk: size %d/%d, lineage %q/%q", m1.VirtualSize, m2.VirtualSize, m1.Layout.Lineage, m2.Layout.Lineage)
	}
	e2fsckRoot(t, g2, rawPlan(t, partition.Legacy, g2))
}

// TestBuildFailures: each bad input gets its typed error, and the output
// directory is left as it was.
func TestBuildFailures(t *testing.T) {
	s := makeStore(t, smallSpecs())
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, o *Options)
		want  error
		msg   []string
	}{
		{"exists", func(t *testing.T, o *Options) {
			os.WriteFile(o.Output, []byte("keep me"), 0o644)
		}, ErrExist, []string{"out.qcow2"}},
		{"too small", func(t *testing.T, o *Options) { o.Size = 2 << 20 }, ErrTooSmall, []string{"needs at least"}},
		{"missing path", func(t *testing.T, o *Options) {
			c := nixclosure.Closure{StoreDir: s.dir, Paths: append([]nixclosure.PathInfo(nil), s.closure.Paths...)}
			i := c.Lookup(s.byName["optimised"])
			i.Path = s.dir + "/" + storeHash("gone", "gone") + "-gone"
			c.Sort()
			o.Closure = &c
		}, ErrMissing, []string{"-gone", "nix-store --realise"}},
		{"hash mismatch", func(t *testing.T, o *Options) {
			c := s.withHashes(t)
			c.Paths[1].NarHash = c.Paths[0].NarHash
			o.Closure = c
		}, nixclosure.ErrHashMismatch, []string{"got sha256:", "want sha256:"}},
		{"toplevel not in closure", func(t *testing.T, o *Options) { o.Toplevel = s.dir + "/x" }, nil, []string{"not in the closure"}},
		{"bad format", func(t *testing.T, o *Options) { o.Format = "vmdk" }, nil, []string{"vmdk"}},
		{"bad level", func(t *testing.T, o *Options) { o.Compression, o.Level = qcow.Zlib, 5 }, qcow.ErrInvalidOptions, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o := s.opts(t, filepath.Join(dir, "out.qcow2"))
			tc.setup(t, &o)
			before := dirNames(t, dir)
			_, err := Build(context.Background(), o)
			if err == nil {
				t.Fatal("Build succeeded, want an error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if after := dirNames(t, dir); after != before {
				t.Errorf("output directory: before %q, after %q", before, after)
			}
		})
	}
}

// TestBuildSpecialFile: a FIFO in a store path is refused by name.
func TestBuildSpecialFile(t *testing.T) {
	specs := smallSpecs()
	s := makeStore(t, specs)
	fifo := s.byName["optimised"] + "/fifo"
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, err := Build(context.Background(), s.opts(t, filepath.Join(dir, "out.qcow2")))
	if !errors.Is(err, ErrUnsupportedFile) || !strings.Contains(err.Error(), fifo) || !strings.Contains(err.Error(), "FIFO") {
		t.Errorf("got %v, want ErrUnsupportedFile naming %s as a FIFO", err, fifo)
	}
	if got := dirNames(t, dir); got != "" {
		t.Errorf("left %s", got)
	}
}
