package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// TestBenchGrowVsGrowpart times, in one TCG guest, growing a 2 GiB ext4
// root (GPT, sparse qcow2 resized to 50 GiB) with nixvm-resize against
// Debian's growpart + resize2fs (cloud-guest-utils, e2fsprogs, util-linux,
// gdisk copied with their libraries into the initramfs). Slow, so only with
// NIXVM_BENCH=1:
//
//	NIXVM_BENCH=1 go test ./cmd/nixvm-resize -run TestBenchGrowVsGrowpart -v
//
// Each tool grows its own copy of the same image; the guest measures wall
// time with /proc/uptime (10 ms resolution) and the order alternates over
// two rounds.
func TestBenchGrowVsGrowpart(t *testing.T) {
	if os.Getenv("NIXVM_BENCH") == "" {
		t.Skip("benchmark: set NIXVM_BENCH=1")
	}
	testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img", "busybox", "sfdisk", "mkfs.ext4", "growpart", "resize2fs", "partx", "flock", "sgdisk", "ldd")
	kernel, rel := vmtest.Kernel(t)
	dir := t.TempDir()

	base := &guestDisk{name: "base", label: "gpt", script: "start=2048\n", sizeMiB: 2048, format: "qcow2", iface: "virtio"}
	base.create(t, dir)
	const rounds = 2
	var disks []vmtest.Disk
	for i := 0; i < 2*rounds; i++ {
		p := filepath.Join(dir, fmt.Sprintf("d%d.qcow2", i))
		sh(t, "", "cp", "--sparse=always", base.path, p)
		sh(t, "", "qemu-img", "resize", "-q", "-f", "qcow2", p, "50G")
		disks = append(disks, vmtest.Disk{Path: p, Format: "qcow2"})
	}

	// growpart and the programs it runs, with their shared libraries.
	files := hostTools(t, "growpart", "sfdisk", "sgdisk", "partx", "flock", "resize2fs")
	files = append(files, vmtest.File{Path: "bin/nixvm-resize", HostPath: buildResize(t)})

	script := `
now() { cut -d' ' -f1 /proc/uptime; }
grow() { # tool disk
	mkdir -p /mnt/$2; mount -t ext4 /dev/${2}1 /mnt/$2 || echo "@@fail mount $2"
	t0=$(now)
	case $1 in
	nixvm-resize) nixvm-resize --mountpoint /mnt/$2 >/tmp/log 2>&1 ;;
	growpart) (PATH=/opt/host/bin:$PATH; growpart /dev/$2 1 && resize2fs /dev/${2}1) >/tmp/log 2>&1 ;;
	esac
	rc=$?
	t1=$(now)
	size=$(df -k /mnt/$2 | tail -n 1 | awk '{print $2}')
	sed "s|^|[$1 $2] |" /tmp/log
	umount /mnt/$2
	echo "@@bench $1 $2 rc=$rc seconds=$(echo "$t0 $t1" | awk '{printf "%.2f", $2-$1}') df_kib=$size"
}
grow nixvm-resize vda
grow growpart vdb
grow growpart vdc
grow nixvm-resize vdd
`
	mods, err := vmtest.Modules(filepath.Join("/lib/modules", rel), "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
	if err != nil {
		t.Fatal(err)
	}
	initrd := vmtest.Initramfs(t, vmtest.InitramfsConfig{Modules: mods, Files: files, Script: script})
	out, err := vmtest.Run(context.Background(), vmtest.Config{Kernel: kernel, Initrd: initrd, Disks: disks}, 10*time.Minute)
	t.Logf("serial output:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	res := vmtest.Markers(out, "bench")
	if len(res) != 2*rounds {
		t.Fatalf("got %d results, want %d", len(res), 2*rounds)
	}
	for _, r := range res {
		t.Logf("RESULT %s", r)
		if !strings.Contains(r, "rc=0") {
			t.Errorf("failed: %s", r)
		}
	}
}
