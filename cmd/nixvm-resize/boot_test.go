package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// bootResizeFixture builds testdata/fixture/bootable-resize.nix (the bootable
// fixture whose init runs nixvm-resize) with the given static binary in its
// closure and returns its toplevel.
func bootResizeFixture(t *testing.T, resizeBin string) string {
	t.Helper()
	nixBuild := testutil.NeedTool(t, "nix-build")[0]
	out := filepath.Join(t.TempDir(), "result")
	cmd := exec.Command(nixBuild, filepath.Join(nixfixture.ExprDir(), "bootable-resize.nix"),
		"--argstr", "resize", resizeBin,
		"--option", "substituters", "", "--option", "sandbox", "false", "--out-link", out)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, stderr.String())
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		t.Fatalf("%v printed no store path", cmd.Args)
	}
	return f[len(f)-1]
}

// buildStatic builds the static (CGO_ENABLED=0) binary of package pkg into a
// temporary directory.
func buildStatic(t *testing.T, pkg, name string) string {
	t.Helper()
	goTool := testutil.NeedTool(t, "go")[0]
	bin := filepath.Join(t.TempDir(), name)
	cmd := exec.Command(goTool, "build", "-trimpath", "-o", bin, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	return bin
}

func virtualSize(t *testing.T, img string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(sh(t, "", "qemu-img", "info", "--output=json", img)), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// TestBootGrow is the full boot path: the bootable fixture with nixvm-resize
// in its closure, built by nixvm-image with its boot loader (GRUB on the MBR,
// installed by the VM stage), grown 4x with qemu-img resize, boots under
// SeaBIOS from its own MBR (no -kernel). Its init runs nixvm-resize twice
// and prints df's size of / before and after on the serial console. On the
// host afterwards: the partition ends at the disk's end, sfdisk --verify and
// e2fsck -fn are clean.
func TestBootGrow(t *testing.T) {
	testutil.Short(t)
	testutil.NeedRoot(t)
	testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img", "sfdisk", "e2fsck", "losetup")
	resizeBin := buildResize(t)
	top := bootResizeFixture(t, resizeBin)
	imageBin := buildStatic(t, "../nixvm-image", "nixvm-image")
	dir := t.TempDir()
	img := filepath.Join(dir, "boot.qcow2")
	start := time.Now()
	cmd := exec.Command(imageBin, "build", "--quiet", "--toplevel", top, "-o", img, "--vm-init", imageBin, "--accel", "tcg")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", vmtest.ShellQuote(cmd.Args), err, out)
	}
	t.Logf("nixvm-image build with the VM stage: %s", time.Since(start).Round(time.Millisecond))
	built := virtualSize(t, img)
	grown := 4 * built
	sh(t, "", "qemu-img", "resize", "-q", "-f", "qcow2", img, fmt.Sprint(grown))

	qemu := testutil.NeedTool(t, "qemu-system-x86_64")[0]
	args := []string{"-machine", "pc,accel=tcg", "-m", "512", "-nodefaults", "-nographic", "-no-reboot",
		"-serial", "stdio", "-nic", "none", "-drive", "if=virtio,format=qcow2,file=" + img}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start = time.Now()
	b, err := exec.CommandContext(ctx, qemu, args...).CombinedOutput()
	out := strings.ReplaceAll(string(b), "\r", "")
	took := time.Since(start).Round(time.Millisecond)
	if i := strings.Index(out, "initrd: root "); i >= 0 && err == nil {
		t.Logf("boot took %s; serial output from the initrd on:\n%s", took, out[i:])
	} else {
		t.Logf("boot took %s; serial output:\n%s", took, out)
	}
	after := vmtest.Markers(out, "nixvm-resize-boot after")
	before := vmtest.Markers(out, "nixvm-resize-boot before")
	if len(after) != 1 || len(before) != 1 {
		t.Fatalf("the fixture's init did not report (%v); reproduce with:\n  %s", err, vmtest.ShellQuote(append([]string{qemu}, args...)))
	}
	if want := "initrd: root /dev/vda1, init " + top + "/init"; !strings.Contains(out, want) {
		t.Errorf("serial output lacks %q: GRUB did not boot the system", want)
	}
	kv := map[string]int64{}
	for _, f := range strings.Fields(before[0] + " " + strings.ReplaceAll(after[0], "df_kib", "df_after")) {
		k, v, _ := strings.Cut(f, "=")
		kv[k], _ = strconv.ParseInt(v, 10, 64)
	}
	if !strings.Contains(after[0], "rc1=0 rc2=0") {
		t.Errorf("nixvm-resize exit codes: %s, want rc1=0 rc2=0", after[0])
	}
	if !strings.Contains(out, "done: / grew from") || !strings.Contains(out, "nothing to do: / already fills /dev/vda") {
		t.Errorf("want a grow, then a no-op run, in the serial output")
	}

	raw := filepath.Join(dir, "boot.raw")
	sh(t, "", "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
	pstart, psize := sfdiskPart(t, raw, 1)
	if end, want := pstart+psize-1, grown/512-1; end != want {
		t.Errorf("partition 1 ends at sector %d, want %d (the grown disk's last)", end, want)
	}
	sh(t, "", "sfdisk", "--verify", raw)
	partKiB := psize / 2
	if a := kv["df_after"]; a < partKiB*95/100 || a > partKiB || a < 3*kv["df_kib"] {
		t.Errorf("df on the booted guest: %d KiB before, %d after; want about the partition's %d KiB", kv["df_kib"], a, partKiB)
	}
	t.Logf("root file system at boot: %d KiB before, %d KiB after (disk %d -> %d MiB)", kv["df_kib"], kv["df_after"], built>>20, grown>>20)
	e2fsckPartition(t, raw, pstart*512, psize*512)
}
