package demo

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

func mustRun(t *testing.T, stdin string, argv ...string) string {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", vmtest.ShellQuote(argv), err, out)
	}
	return string(out)
}

// TestGrow runs the demo's engine on a 64 MiB MBR disk whose ext4 is
// labelled nixos (the shape of nixvm-image's legacy layout) and on one whose
// file system has another label, each in its own TCG guest: the first grows
// 4x (df in the guest, partition end and e2fsck -fn on the host), the second
// fails with ErrGuest and names the label.
func TestGrow(t *testing.T) {
	testutil.Short(t)
	testutil.NeedRoot(t) // loop device for e2fsck on the partition
	tools := testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img", "busybox", "sfdisk", "mkfs.ext4", "e2fsck", "losetup", "go")
	vmtest.Kernel(t) // skips (fails in CI) without a kernel
	dir := t.TempDir()
	resize := filepath.Join(dir, "nixvm-resize")
	build := exec.Command(tools[7], "build", "-trimpath", "-o", resize, "../../cmd/nixvm-resize")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", build.Args, err, out)
	}
	image := func(name, label string) string {
		raw := filepath.Join(dir, name+".raw")
		if err := os.WriteFile(raw, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		os.Truncate(raw, 64<<20)
		mustRun(t, "label: dos\nstart=2048\n", "sfdisk", "-q", "--no-reread", "--no-tell-kernel", raw)
		mustRun(t, "", "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-E", "offset=1048576", raw, "63M")
		img := filepath.Join(dir, name+".qcow2")
		mustRun(t, "", "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
		return img
	}

	t.Run("grows", func(t *testing.T) {
		var cmds []string
		out := filepath.Join(dir, "grown.qcow2")
		res, err := Grow(context.Background(), GrowOptions{
			Image: image("nixos", "nixos"), Output: out, Resize: resize, Timeout: 3 * time.Minute,
			Command: func(argv []string) { cmds = append(cmds, argv[0]) },
		})
		if err != nil {
			if res != nil {
				t.Logf("serial output:\n%s", res.Serial)
			}
			t.Fatal(err)
		}
		t.Logf("transcript:\n%s", res.Transcript)
		if res.BuiltSize != 64<<20 || res.GrownSize != 256<<20 {
			t.Errorf("disk: got %d -> %d bytes, want %d -> %d", res.BuiltSize, res.GrownSize, 64<<20, 256<<20)
		}
		if got := strings.Join(cmds, " "); got != "qemu-img qemu-img qemu-img qemu-system-x86_64" {
			t.Errorf("commands: got %s, want qemu-img info, convert, resize, then QEMU", got)
		}
		if n := strings.Count(res.Transcript, "\n/dev/vda1 "); n != 2 {
			t.Errorf("transcript: got %d df lines for /dev/vda1, want 2 (before and after)", n)
		}
		if !strings.Contains(res.Transcript, "done: /mnt grew from") {
			t.Errorf("transcript lacks nixvm-resize's summary")
		}
		raw := filepath.Join(dir, "grown.raw")
		mustRun(t, "", "qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, raw)
		dump := mustRun(t, "", "sfdisk", "--dump", raw)
		wantSize := int64(256<<20)/512 - 2048 // MBR: to the last sector
		if !strings.Contains(dump, "size=") || !strings.Contains(strings.ReplaceAll(dump, " ", ""), "start=2048,size="+itoa(wantSize)) {
			t.Errorf("partition table after the guest, want partition 1 of %d sectors:\n%s", wantSize, dump)
		}
		// df's size is the file system minus its overhead: within 5% of the partition.
		partKiB := wantSize / 2
		if res.AfterKiB < partKiB*95/100 || res.AfterKiB > partKiB || res.BeforeKiB > 64<<10 {
			t.Errorf("df: %d KiB before, %d after; want at most 64 MiB before and about %d KiB after", res.BeforeKiB, res.AfterKiB, partKiB)
		}
		loop := strings.TrimSpace(mustRun(t, "", "losetup", "-r", "-f", "--show", "-o", "1048576", "--sizelimit", itoa(wantSize*512), raw))
		defer exec.Command("losetup", "-d", loop).Run()
		mustRun(t, "", "e2fsck", "-fn", loop)
	})

	t.Run("no nixos label", func(t *testing.T) {
		res, err := Grow(context.Background(), GrowOptions{
			Image: image("other", "other"), Output: filepath.Join(dir, "other-grown.qcow2"), Resize: resize, Timeout: 3 * time.Minute,
		})
		if !errors.Is(err, ErrGuest) || !strings.Contains(err.Error(), "no file system labelled nixos") {
			if res != nil {
				t.Logf("serial output:\n%s", res.Serial)
			}
			t.Errorf("got %v, want ErrGuest naming the missing label", err)
		}
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
