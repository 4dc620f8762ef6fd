package provision

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// This machine's kernel has no device-mapper, so LVM volumes cannot be
// activated on a loop device here. The LVM test boots Debian's kernel in
// QEMU (TCG) with dm-mod, Debian's lvm binary (with its libraries) and a
// static nixvm-image in the initramfs: the PV is a raw file on /dev/vda, the
// base generation's bytes are /dev/vdb, and the provisioned LV is copied to
// /dev/vdc so the host can check it with qemu-img compare.

// lvmFiles returns lvm, its shared libraries and the dynamic loader as
// initramfs files, plus a wrapper per LVM command (lvm dispatches on its
// first argument) and an lvm.conf for a system without udev.
func lvmFiles(t *testing.T) []vmtest.File {
	t.Helper()
	lvm := testutil.NeedTool(t, "lvm")[0]
	ldd := testutil.NeedTool(t, "ldd")[0]
	out, err := exec.Command(ldd, lvm).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", lvm, err)
	}
	files := []vmtest.File{{Path: "/usr/sbin/lvm", HostPath: lvm}}
	for _, m := range regexp.MustCompile(`(?m)(/\S+\.so[.\d]*)\s+\(0x`).FindAllStringSubmatch(string(out), -1) {
		files = append(files, vmtest.File{Path: m[1], HostPath: m[1]})
	}
	for _, c := range []string{"pvcreate", "vgcreate", "lvcreate", "lvremove", "lvs"} {
		files = append(files, vmtest.File{Path: "/sbin/" + c, Data: []byte("#!/bin/sh\nexec /usr/sbin/lvm " + c + " \"$@\"\n")})
	}
	files = append(files, vmtest.File{Path: "/etc/lvm/lvm.conf", Mode: 0o644, Data: []byte(`devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { event_activation = 0 }
`)})
	return files
}

func buildNixvmImage(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "nixvm-image")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "../cmd/nixvm-image")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestLVM provisions onto an LVM volume that provision creates itself with
// lvcreate, on extents that a volume full of random data just freed: the
// copy must equal the base and every byte past it must read as zero
// (qemu-img compare over the whole LV). A second run leaves the LV
// byte for byte as the guest left it.
func TestLVM(t *testing.T) {
	testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img")
	kernel, rel := vmtest.Kernel(t)
	mods, err := vmtest.Modules(filepath.Join("/lib/modules", rel), "virtio_pci", "virtio_blk", "dm_mod")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(40, 12*mib))
	bin := buildNixvmImage(t, dir)
	pv := filepath.Join(dir, "pv.raw")
	lvCopy := filepath.Join(dir, "lv.raw")
	for p, size := range map[string]int64{pv: 64 * mib, lvCopy: 24 * mib} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
	}
	script := `
mkdir -p /run/lock/lvm /run/lvm
pvcreate -q /dev/vda && vgcreate -q vgt /dev/vda || echo "@@error vg"
lvcreate -q -y -L 24m -n junk vgt && dd if=/dev/urandom of=/dev/vgt/junk bs=1M count=24 2>/dev/null && lvremove -q -y vgt/junk || echo "@@error junk"
nixvm-image provision --image /dev/vdb --guest g --size 20M --target /dev/vgt/guest-g
echo "@@provision $?"
dd if=/dev/vgt/guest-g of=/dev/vdc bs=1M 2>/dev/null
echo "@@lvsize $(blockdev --getsize64 /dev/vgt/guest-g)"
echo guest-data | dd of=/dev/vgt/guest-g bs=1 seek=4096 conv=notrunc 2>/dev/null
a=$(sha256sum /dev/vgt/guest-g | cut -d' ' -f1)
nixvm-image provision --image /dev/vdb --guest g --size 20M --target /dev/vgt/guest-g
echo "@@again $?"
b=$(sha256sum /dev/vgt/guest-g | cut -d' ' -f1)
[ "$a" = "$b" ] && echo "@@untouched yes" || echo "@@untouched no"
`
	files := append(lvmFiles(t), vmtest.File{Path: "/bin/nixvm-image", HostPath: bin})
	initrd := filepath.Join(dir, "initrd")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := vmtest.BuildInitramfs(f, vmtest.InitramfsConfig{Modules: mods, Script: script, Files: files}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := vmtest.Run(context.Background(), vmtest.Config{Kernel: kernel, Initrd: initrd, MemoryMiB: 512,
		Disks: []vmtest.Disk{{Path: pv}, {Path: g.Path, Format: "raw"}, {Path: lvCopy}}}, 4*time.Minute)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for k, want := range map[string]string{"provision": "0", "again": "0", "untouched": "yes", "lvsize": "20971520"} {
		if got := vmtest.Markers(out, k); len(got) != 1 || got[0] != want {
			t.Errorf("%s: got %q, want %q\n%s", k, got, want, out)
		}
	}
	if got := vmtest.Markers(out, "error"); len(got) > 0 {
		t.Fatalf("guest setup failed: %q\n%s", got, out)
	}
	if !strings.Contains(out, "created /dev/vgt/guest-g: 20.0 MiB disk") || !strings.Contains(out, "/dev/vgt/guest-g exists, left untouched") {
		t.Errorf("provision output missing:\n%s", out)
	}
	// The LV copy: base data, then zeros to the LV's end (20 MiB); lv.raw's
	// last 4 MiB were never written.
	compareWithBase(t, lvCopy, "raw", g.Path)
}
