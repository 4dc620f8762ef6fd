package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

func readManifest(t *testing.T, name string) *manifest.Manifest {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := manifest.Read(f)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if m.Layout == nil {
		t.Fatalf("%s has no layout map", name)
	}
	return m
}

// buildRaw builds fx into dir/name.raw with extra flags and returns its
// manifest.
func buildRaw(t *testing.T, fx *nixfixture.Fixture, out string, extra ...string) *manifest.Manifest {
	t.Helper()
	args := append([]string{"build", "--no-bootloader", "--toplevel", fx.Toplevel, "--format", "raw", "-o", out}, extra...)
	_, stderr, code := run(t, args...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s", args, code, stderr)
	}
	t.Logf("%v:\n%s", args[1:], stderr)
	return readManifest(t, out+".manifest")
}

// newUnitBlocks counts the blocks of the units of m that prev's layout
// map does not have: the data of new store paths (and files outside the
// store that changed unit, none normally).
func newUnitBlocks(prev, m *manifest.Manifest) uint64 {
	var n uint64
	for _, u := range m.Layout.Units {
		if prev.Layout.Unit(u.Name) != nil {
			continue
		}
		for _, r := range u.Blocks {
			n += r.Len
		}
	}
	return n
}

// sendBlocks counts the non-zero blocks of m whose hash is in none of the
// manifests in have, adding them to have: what a push sends at most.
func sendBlocks(have map[manifest.Hash]bool, m *manifest.Manifest) int {
	n := 0
	for _, h := range m.Blocks {
		if h != manifest.ZeroHash() && !have[h] {
			n++
			have[h] = true
		}
	}
	return n
}

func rootOf(t *testing.T, raw string, m *manifest.Manifest) string {
	t.Helper()
	return partitionFile(t, raw, partition.Extent{Start: m.Layout.RootOffset, Size: m.Layout.RootSize})
}

// layoutSlack is what a generation may change beyond its new store paths:
// superblock and descriptor copies, bitmaps, inode table blocks, the store
// directory, the Nix database's changed pages, the profile links.
const layoutSlack = 256

// TestBuildPrevious builds generation 2 of the series fixture (bash and
// churn-a changed, hello added, extra-odd removed) from generation 1 with
// --previous and checks the image with e2fsck and Nix, and that it differs
// from generation 1 in little more than the new paths' blocks.
func TestBuildPrevious(t *testing.T) {
	tools := testutil.NeedTool(t, "e2fsck", "nix-store")
	e2fsck, nixStore := tools[0], tools[1]
	fx1 := nixfixture.Build(t, "series1")
	fx2 := nixfixture.Build(t, "series2")
	dir := t.TempDir()
	g1 := filepath.Join(dir, "g1.raw")
	m1 := buildRaw(t, fx1, g1)

	g2 := filepath.Join(dir, "g2.raw")
	m2 := buildRaw(t, fx2, g2, "--previous", g1)
	root := rootOf(t, g2, m2)
	mustRun(t, e2fsck, "-fn", root)
	checkStore(t, nixStore, fx2, root)

	diff := len(manifest.Diff(m1, m2))
	newBlocks := newUnitBlocks(m1, m2)
	bound := 2*int(newBlocks) + layoutSlack
	t.Logf("generation 2 from 1: %d blocks differ, %d blocks in new store paths, bound %d", diff, newBlocks, bound)
	if newBlocks == 0 {
		t.Fatal("no new store paths in generation 2: the fixture is wrong")
	}
	if diff > bound {
		t.Errorf("%d blocks differ from generation 1, want at most %d (2 x %d new + %d)", diff, bound, newBlocks, layoutSlack)
	}
	// Every store path in both keeps its place.
	for _, u := range m1.Layout.Units {
		if u.Name == "" || u.Name[0] == '/' {
			continue
		}
		if v := m2.Layout.Unit(u.Name); v != nil && fmt.Sprint(u) != fmt.Sprint(*v) {
			t.Errorf("store path %s moved: got %v, want %v", u.Name, *v, u)
		}
	}

	// A fresh layout moves far more: the bound means something.
	fresh := filepath.Join(dir, "fresh.raw")
	mf := buildRaw(t, fx2, fresh, "--previous", "none")
	if d := len(manifest.Diff(m1, mf)); d <= bound {
		t.Errorf("a fresh layout differs in %d blocks, within the bound %d", d, bound)
	} else {
		t.Logf("fresh layout: %d blocks differ", d)
	}

	t.Run("deterministic", func(t *testing.T) {
		again := buildRaw(t, fx2, filepath.Join(t.TempDir(), "g2.raw"), "--previous", g1+".manifest")
		if again.Digest != m2.Digest {
			t.Errorf("same closure and previous: digest %x, want %x", again.Digest, m2.Digest)
		}
		self := buildRaw(t, fx1, filepath.Join(t.TempDir(), "g1.raw"), "--previous", g1)
		if self.Digest != m1.Digest {
			t.Errorf("generation 1 kept on itself: digest %x, want %x (a fresh build's)", self.Digest, m1.Digest)
		}
	})
	t.Run("auto", func(t *testing.T) {
		// --force over an output with a manifest keeps its layout by default.
		out := filepath.Join(t.TempDir(), "out.raw")
		for _, s := range []string{"", ".manifest"} {
			b, err := os.ReadFile(g1 + s)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(out+s, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if m := buildRaw(t, fx2, out, "--force"); m.Digest != m2.Digest {
			t.Errorf("--force over generation 1: digest %x, want %x (--previous)", m.Digest, m2.Digest)
		}
		if m := buildRaw(t, fx2, out, "--force", "--previous", "none"); m.Digest != mf.Digest {
			t.Errorf("--previous none: digest %x, want %x (fresh)", m.Digest, mf.Digest)
		}
	})
	t.Run("image only", func(t *testing.T) {
		// Without its manifest, the previous image's own file system gives
		// the layout: the same store paths keep their blocks.
		only := filepath.Join(t.TempDir(), "only.raw")
		b, err := os.ReadFile(g1)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(only, b, 0o644); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "g2.raw")
		m := buildRaw(t, fx2, out, "--previous", only)
		mustRun(t, e2fsck, "-fn", rootOf(t, out, m))
		d := len(manifest.Diff(m1, m))
		t.Logf("from the image alone: %d blocks differ from generation 1 (%d with its manifest)", d, diff)
		if d > bound {
			t.Errorf("%d blocks differ from generation 1, want at most %d", d, bound)
		}
	})
	t.Run("too small", func(t *testing.T) {
		// A previous disk just big enough for glibc alone cannot hold
		// generation 2: the build says so, then lays out afresh.
		small := filepath.Join(t.TempDir(), "small.raw")
		glibc := fx1.Path("glibc-")
		_, stderr, code := run(t, "build", "--no-bootloader", "--toplevel", glibc, "--format", "raw", "-o", small, "--size", "1M")
		var need float64
		if i := strings.Index(stderr, "needs at least "); code == 0 || i < 0 {
			t.Fatalf("--size 1M: exit %d, want a minimum size in: %s", code, stderr)
		} else if _, err := fmt.Sscanf(stderr[i:], "needs at least %f MiB", &need); err != nil {
			t.Fatalf("parse %q: %v", stderr[i:], err)
		}
		args := []string{"build", "--no-bootloader", "--toplevel", glibc, "--format", "raw", "-o", small, "--size", fmt.Sprintf("%dM", int(need)+1)}
		if _, stderr, code := run(t, args...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		out := filepath.Join(t.TempDir(), "next.raw")
		args = []string{"build", "--no-bootloader", "--toplevel", fx2.Toplevel, "--format", "raw", "-o", out, "--previous", small}
		_, stderr, code = run(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		if want := "previous layout not used: free space runs short"; !strings.Contains(stderr, want) {
			t.Errorf("build log lacks %q:\n%s", want, stderr)
		}
		if m := readManifest(t, out+".manifest"); m.Digest != mf.Digest {
			t.Errorf("digest %x, want the fresh layout's %x", m.Digest, mf.Digest)
		}
	})
}

// TestBuildTenGenerations builds generations 1 to 10 of the series fixture,
// each from the one before: every image passes e2fsck, and each push (the
// blocks no earlier image has) stays within the bound of its new paths.
func TestBuildTenGenerations(t *testing.T) {
	testutil.Short(t)
	tools := testutil.NeedTool(t, "e2fsck", "nix-store")
	e2fsck, nixStore := tools[0], tools[1]
	dir := t.TempDir()
	have := map[manifest.Hash]bool{}
	var prev *manifest.Manifest
	prevImg := ""
	for g := 1; g <= 10; g++ {
		fx := nixfixture.Build(t, fmt.Sprintf("series%d", g))
		img := filepath.Join(dir, fmt.Sprintf("g%d.raw", g))
		var m *manifest.Manifest
		if prev == nil {
			m = buildRaw(t, fx, img)
		} else {
			m = buildRaw(t, fx, img, "--previous", prevImg)
		}
		root := rootOf(t, img, m)
		mustRun(t, e2fsck, "-fn", root)
		send := sendBlocks(have, m)
		if prev != nil {
			newBlocks := newUnitBlocks(prev, m)
			bound := 2*int(newBlocks) + layoutSlack
			t.Logf("generation %d: push sends %d blocks (%d KiB), %d blocks in new store paths, %d differ from generation %d", g, send, send*4, newBlocks, len(manifest.Diff(prev, m)), g-1)
			if send > bound {
				t.Errorf("generation %d: push sends %d blocks, want at most %d", g, send, bound)
			}
		}
		if g == 10 {
			checkStore(t, nixStore, fx, root)
		}
		os.Remove(root)
		if prevImg != "" {
			os.Remove(prevImg)
		}
		prev, prevImg = m, img
	}
}
