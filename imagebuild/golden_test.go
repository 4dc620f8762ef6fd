package imagebuild

import (
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// goldenLock is flocked to serialise the golden builds of concurrent test
// processes (their store paths have fixed names): the store directory
// itself, so the lock leaves no file behind.
const goldenLock = "/nix/store"

// TestGolden pins the bytes of three images of the tiny closure, made with
// fixed store paths: a qcow2 (legacy, zstd), a raw disk (hybrid: GPT,
// BIOS boot and ESP) and a layout-stable rebuild with one path changed. Any
// change to what the builder writes changes these digests: update them only
// for a deliberate format change, and say so in the commit.
func TestGolden(t *testing.T) {
	testutil.NeedRoot(t)
	lock, err := os.Open(goldenLock)
	if err != nil {
		testutil.Skip(t, "cannot lock %s: %v", goldenLock, err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	s := makeStoreSalted(t, "golden", smallSpecs())
	dir := t.TempDir()

	img := filepath.Join(dir, "g1.qcow2")
	mustBuild(t, s.opts(t, img))

	raw := filepath.Join(dir, "hybrid.raw")
	o := s.opts(t, raw)
	o.Layout, o.Format = partition.Hybrid, FormatRaw
	resRaw := mustBuild(t, o)

	specs := smallSpecs()
	specs[1].entries[2].data += "patched\n"
	specs[1].name = "bash-5.2-p1"
	specs[3].name, specs[3].refs[0], specs[3].entries[3].symlink = "nixos-system-test-2", "bash-5.2-p1", "@bash-5.2-p1/bin/sh"
	s2 := makeStoreSalted(t, "golden", specs)
	img2 := filepath.Join(dir, "g2.qcow2")
	o = s2.opts(t, img2)
	o.Previous = img
	mustBuild(t, o)

	for _, g := range []struct{ name, got, want string }{
		{"qcow2 sha256", testutil.SHA256File(t, img), "f85b6d57607ec884a6f5a413a85f285c21d62b0a04a97ff4e9a87bd4481f2271"},
		{"qcow2 manifest sha256", testutil.SHA256File(t, ManifestPath(img)), "9197b4af63aaeb1939d4b4d7cf0319ba56c76f28a23b572442ebfd6c8238c4f4"},
		{"raw disk digest", hex.EncodeToString(resRaw.Digest[:]), "11d88a1bf9715b3788dfed71a7a4fd04049dae3e53a57eb81e6b28f0ca01284c"},
		{"raw manifest sha256", testutil.SHA256File(t, ManifestPath(raw)), "44b09c980ac3bbfed90919f0481dbddbf021f5e885eb1cec9bbd1476954a20c1"},
		{"rebuild sha256", testutil.SHA256File(t, img2), "0f39f63c75303c2a75ea02b04f33160997150f5e3c0cd4bc48113b7dec5b73b6"},
		{"rebuild manifest sha256", testutil.SHA256File(t, ManifestPath(img2)), "cda4a4107c7ac2cf104c72d5407a942e049725da43984aedffc974249fd8b1a7"},
	} {
		if g.got != g.want {
			t.Errorf("%s: got %s, want %s", g.name, g.got, g.want)
		}
	}
	// Nix itself checks the store and database of the raw disk (after its
	// digest: a mount writes to it).
	nixStore := testutil.NeedTool(t, "nix-store")[0]
	plan := rawPlan(t, partition.Hybrid, raw)
	mnt := t.TempDir()
	testutil.Mount(t, testutil.AttachLoop(t, raw, plan.Root.Start, plan.Root.Size), mnt) // read-write: Nix remounts the store
	testutil.Run(t, nixStore, "--store", "local?root="+mnt, "--verify", "--check-contents")
}
