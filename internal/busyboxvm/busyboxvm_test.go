package busyboxvm

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/cpio"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// kernel is the host's kernel and its release; the test skips (fails in
// CI) without one.
func kernel(t *testing.T) (string, string) {
	t.Helper()
	path, rel, err := FindKernel("")
	if err != nil {
		testutil.Skip(t, "%v", err)
	}
	return path, rel
}

func TestCmdline(t *testing.T) {
	base := []string{"-machine", "accel=tcg", "-m", "512", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", "/boot/vmlinuz", "-initrd", "/tmp/i.cpio"}
	tests := []struct {
		name string
		cfg  Config
		want []string
	}{
		{"defaults", Config{Kernel: "/boot/vmlinuz", Initrd: "/tmp/i.cpio"},
			append(append([]string{"qemu-system-x86_64"}, base...), "-append", "console=ttyS0 panic=-1 quiet")},
		{"virtio and nvme disks", Config{QEMU: "/usr/bin/qemu", Kernel: "/boot/vmlinuz", Initrd: "/tmp/i.cpio", Append: "x=1",
			Disks: []Disk{{Path: "/a.img"}, {Path: "/b.qcow2", Format: "qcow2", Interface: "nvme"}, {Path: "/c.img", LogicalBlockSize: 4096, Serial: "c"}}},
			append(append([]string{"/usr/bin/qemu"}, base...), "-append", "console=ttyS0 panic=-1 quiet x=1",
				"-drive", "if=none,id=d0,format=raw,file=/a.img", "-device", "virtio-blk-pci,drive=d0",
				"-drive", "if=none,id=d1,format=qcow2,file=/b.qcow2", "-device", "nvme,drive=d1,serial=nvme1",
				"-drive", "if=none,id=d2,format=raw,file=/c.img", "-device", "virtio-blk-pci,drive=d2,serial=c,logical_block_size=4096,physical_block_size=4096")},
		{"memory", Config{Kernel: "/boot/vmlinuz", Initrd: "/tmp/i.cpio", MemoryMiB: 1024},
			append(append([]string{"qemu-system-x86_64", "-machine", "accel=tcg", "-m", "1024"}, base[4:]...), "-append", "console=ttyS0 panic=-1 quiet")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Cmdline(tt.cfg); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestMarkers(t *testing.T) {
	out := "boot\n@@result a ok\r\n[ 1.0] noise @@result b fail\n@@resultx no\n@@vmtest-done\n"
	if got, want := Markers(out, "result"), []string{"a ok", "b fail"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestModules(t *testing.T) {
	_, rel := kernel(t)
	mods, err := Modules(filepath.Join("/lib/modules", rel), "ext4", "virtio-blk", "virtio_pci")
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
		if !bytes.HasPrefix(m.Data, []byte("\x7fELF")) {
			t.Errorf("%s is not an ELF object (not decompressed?)", m.Name)
		}
	}
	for _, pair := range [][2]string{{"jbd2.ko", "ext4.ko"}, {"mbcache.ko", "ext4.ko"}, {"virtio_ring.ko", "virtio_blk.ko"}, {"virtio.ko", "virtio_pci.ko"}} {
		a, aok := pos[pair[0]]
		b, bok := pos[pair[1]]
		if aok && bok && a > b {
			t.Errorf("%s loads after %s", pair[0], pair[1])
		}
		if !bok {
			t.Errorf("%s missing from %v", pair[1], pos)
		}
	}
	if _, err := Modules(filepath.Join("/lib/modules", rel), "no_such_module"); err == nil {
		t.Error("unknown module: got no error")
	}
}

func TestInitramfsDeterministic(t *testing.T) {
	testutil.NeedTool(t, "busybox")
	cfg := InitramfsConfig{Script: "echo hi\n", Files: []File{{Path: "bin/x", Data: []byte("x")}}}
	var a, b bytes.Buffer
	if err := BuildInitramfs(&a, cfg); err != nil {
		t.Fatal(err)
	}
	if err := BuildInitramfs(&b, cfg); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two builds differ")
	}
	r := cpio.NewReader(&a)
	names := map[string]bool{}
	for {
		h, err := r.Next()
		if err != nil {
			break
		}
		names[h.Name] = true
	}
	for _, n := range []string{"init", "bin/busybox", "bin/sh", "bin/x", "dev/console", "etc/modules.order"} {
		if !names[n] {
			t.Errorf("initramfs lacks %s", n)
		}
	}
}

// TestBoot boots the kernel with a virtio and an nvme disk and checks that
// the guest sees both and reports through markers.
func TestBoot(t *testing.T) {
	testutil.Short(t)
	testutil.NeedTool(t, "qemu-system-x86_64", "busybox")
	kernel, rel := kernel(t)
	mods, err := Modules(filepath.Join("/lib/modules", rel), "virtio_pci", "virtio_blk", "nvme")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	f, _ := os.Create(initrd)
	if err := BuildInitramfs(f, InitramfsConfig{Modules: mods, Script: "echo @@disks $(cd /sys/block && echo vd* nvme*)\n"}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var disks []Disk
	for i, iface := range []string{"virtio", "nvme"} {
		p := filepath.Join(dir, iface+".img")
		os.WriteFile(p, make([]byte, 1<<20), 0o644)
		disks = append(disks, Disk{Path: p, Interface: iface, Serial: []string{"", "s1"}[i]})
	}
	t0 := time.Now()
	out, err := Run(context.Background(), Config{Kernel: kernel, Initrd: initrd, Disks: disks}, 2*time.Minute)
	t.Logf("boot took %s", time.Since(t0))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if got := Markers(out, "disks"); len(got) != 1 || !strings.Contains(got[0], "vda") || !strings.Contains(got[0], "nvme0n1") {
		t.Errorf("disks: got %q, want vda and nvme0n1\n%s", got, out)
	}
}
