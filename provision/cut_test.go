package provision

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// cutChild, when set in the environment, makes TestProvisionCutShort the
// child that copies onto the device and is killed (SIGKILL, by itself)
// after its first write: "image|device|statedir".
const cutChild = "NIXVM_TEST_PROVISION_CUT"

// TestProvisionCutShort (issue 12 item 2): a copy onto a block device that
// is killed midway must not look finished. The next run without --force
// makes the disk again and says so (Redone), instead of "exists, left
// untouched"; the run after that leaves the now complete disk alone.
// Before the fix the second run returned Created false and the device held
// a partial copy.
func TestProvisionCutShort(t *testing.T) {
	if v := os.Getenv(cutChild); v != "" {
		f := strings.Split(v, "|")
		crashHook = func() { syscall.Kill(os.Getpid(), syscall.SIGKILL) }
		_, err := Provision(context.Background(), Request{Image: f[0], Target: f[1], StateDir: f[2], Force: true})
		t.Fatalf("child was not killed: %v", err)
	}
	testutil.NeedRoot(t)
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(7, 8*mib))
	backing := filepath.Join(t.TempDir(), "dev.img")
	writeRandom(t, backing, 16*mib) // old extents: another guest's data
	dev := testutil.AttachLoop(t, backing, 0, 0)
	state := t.TempDir()

	cmd := exec.Command(os.Args[0], "-test.run=^TestProvisionCutShort$", "-test.count=1")
	cmd.Env = append(os.Environ(), cutChild+"="+g.Path+"|"+dev+"|"+state)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: got %v, want killed by SIGKILL\n%s", err, out)
	}

	req := Request{Image: g.Path, Target: dev, StateDir: state}
	res, err := Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Created || !res.Redone {
		t.Fatalf("after a copy killed midway: got %+v, want the disk made again (Created, Redone)", res)
	}
	compareWithBase(t, dev, "raw", g.Path)
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("records left after a complete copy: %v", ents)
	}
	res, err = Provision(context.Background(), req)
	if err != nil || res.Created || res.Redone {
		t.Errorf("complete disk: got %+v, %v, want left alone", res, err)
	}
}

// TestLVNodeNeverAppears (issue 12 item 2): when lvcreate succeeds but the
// LV's device node never appears, provision removes the LV again and
// leaves no record. Before the fix the LV was left behind.
func TestLVNodeNeverAppears(t *testing.T) {
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(8, 2*mib))
	defer func(d time.Duration) { nodeWait = d }(nodeWait)
	nodeWait = 200 * time.Millisecond
	var calls []string
	run := func(_ context.Context, argv []string) ([]byte, error) {
		calls = append(calls, argv[0])
		return nil, nil
	}
	state := t.TempDir()
	_, err := Provision(context.Background(), Request{Image: g.Path, Target: "/dev/nixvm-test-vg/guest1", StateDir: state, Run: run})
	if !errors.Is(err, ErrTarget) || !strings.Contains(err.Error(), "never appeared") {
		t.Errorf("got %v, want ErrTarget: never appeared", err)
	}
	if strings.Join(calls, " ") != "lvcreate lvremove" {
		t.Errorf("ran %q, want lvcreate then lvremove", calls)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("records left: %v", ents)
	}
}

// TestForceRefusedBusyDevice (issue 12 item 3): --force onto a block
// device that is mounted, or opened exclusively by another process, is
// refused with ErrInUse naming what holds it (the mount point), and the
// device is left as it was (its superblock was overwritten before the fix).
func TestForceRefusedBusyDevice(t *testing.T) {
	mkfs := testutil.NeedTool(t, "mkfs.ext4")[0]
	testutil.NeedRoot(t)
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(9, 4*mib))
	backing := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(backing, 16*mib)
	run(t, mkfs, "-q", "-F", backing)
	dev := testutil.AttachLoop(t, backing, 0, 0)
	req := Request{Image: g.Path, Target: dev, StateDir: t.TempDir(), Force: true}

	// Held exclusively by another opener (as a mount, md or LVM would).
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	img := testImage(9, 4*mib)
	_, err = Provision(context.Background(), req)
	f.Close()
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), dev) {
		t.Errorf("device held exclusively: got %v, want ErrInUse naming %s", err, dev)
	}

	mnt := t.TempDir()
	testutil.Mount(t, dev, mnt)
	_, err = Provision(context.Background(), req)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "mounted on "+mnt) {
		t.Errorf("mounted device: got %v, want ErrInUse naming the mount point %s", err, mnt)
	}
	// The ext4 superblock is still there, and none of the image's data.
	b, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	if b[1080] != 0x53 || b[1081] != 0xef {
		t.Errorf("busy device's ext4 superblock overwritten: magic %x", b[1080:1082])
	}
	if bytes.Equal(b[64<<10:128<<10], img[64<<10:128<<10]) {
		t.Error("busy device holds the image's data")
	}
	if ents, _ := os.ReadDir(req.StateDir); len(ents) != 0 {
		t.Errorf("a refused run left records: %v", ents)
	}
}
