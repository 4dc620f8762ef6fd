package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/imagebuild"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/partition"
	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

const mib = 1 << 20

func sh(t testing.TB, stdin string, name string, args ...string) string {
	t.Helper()
	return testutil.RunTool(t, stdin, name, args...)
}

// buildResize builds nixvm-resize statically for the guest.
func buildResize(t testing.TB) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		testutil.Skip(t, "go not on PATH")
	}
	bin := filepath.Join(t.TempDir(), "nixvm-resize")
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	return bin
}

// guestDisk is one scenario: a disk image made on the host, grown like
// `qemu-img resize`, attached to the guest.
type guestDisk struct {
	name     string
	label    string // sfdisk label: gpt or dos
	script   string // sfdisk partition lines
	sizeMiB  int64
	growTo   int64  // bytes; 0: not grown
	format   string // raw or qcow2
	iface    string // virtio or nvme
	mkfsOpts []string
	whole    bool // ext4 on the whole disk, no partition table
	table4k  bool // no table on the host: the guest writes a GPT with 4096-byte sectors
	dm       bool // the guest mounts partition 1 through a device-mapper linear target
	// nix, when set, is a layout: the disk is the small Nix fixture built by
	// nixvm-image (imagebuild.Build, no boot loader) with it, copied (qcow2)
	// or converted (raw) and grown with qemu-img resize to growTo, or to 4x
	// its size when growTo is 0.
	nix  partition.Layout
	part int // the root partition's number; 0 means 1

	path      string
	partStart int64 // bytes
	hash      [32]byte
}

// rootPart is the number of the partition the guest mounts.
func (g *guestDisk) rootPart() int {
	if g.part == 0 {
		return 1
	}
	return g.part
}

var (
	nixImagesMu sync.Mutex
	nixImages   = map[partition.Layout]*imagebuild.Result{}
)

// nixImage builds the small Nix fixture with nixvm-image's builder (qcow2, no
// boot loader) once per layout and test process.
func nixImage(t *testing.T, layout partition.Layout) *imagebuild.Result {
	t.Helper()
	nixImagesMu.Lock()
	defer nixImagesMu.Unlock()
	if r := nixImages[layout]; r != nil {
		return r
	}
	fx := nixfixture.Build(t, "small")
	ctx := context.Background()
	c, err := nixclosure.FromToplevel(ctx, fx.Toplevel)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "nixvm-resize-image-")
	if err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir: the cache outlives the test that built it.
	t.Cleanup(func() { os.RemoveAll(dir) })
	r, err := imagebuild.Build(ctx, imagebuild.Options{
		Closure:  c,
		Toplevel: fx.Toplevel,
		Output:   filepath.Join(dir, string(layout)+".qcow2"),
		Layout:   layout,
	})
	if err != nil {
		t.Fatalf("nixvm-image build --layout %s: %v", layout, err)
	}
	nixImages[layout] = r
	return r
}

func (g *guestDisk) create(t *testing.T, dir string) {
	t.Helper()
	if g.nix != "" {
		img := nixImage(t, g.nix)
		if g.growTo == 0 {
			g.growTo = 4 * img.DiskSize
		}
		g.path = filepath.Join(dir, g.name+"."+g.format)
		if g.format == "qcow2" {
			sh(t, "", "cp", "--sparse=always", img.Output, g.path)
		} else {
			sh(t, "", "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img.Output, g.path)
		}
		sh(t, "", "qemu-img", "resize", "-q", "-f", g.format, g.path, fmt.Sprint(g.growTo))
		return
	}
	raw := filepath.Join(dir, g.name+".raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(raw, g.sizeMiB*mib)
	switch {
	case g.whole:
		sh(t, "", "mkfs.ext4", "-q", "-F", "-b", "4096", raw)
		g.path = raw
		sh(t, "", "qemu-img", "resize", "-q", "-f", "raw", g.path, fmt.Sprint(g.growTo))
		return
	case g.table4k:
		// Partition 1 will be 4096-byte sectors 256-16127 (1 MiB, 62 MiB).
		sh(t, "", "mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "offset=1048576", raw, "62M")
		g.path, g.partStart = raw, 1<<20
		return
	}
	sh(t, "label: "+g.label+"\n"+g.script, "sfdisk", "--no-reread", "--no-tell-kernel", "-q", raw)
	start, size := sfdiskPart(t, raw, 1)
	g.partStart = start * 512
	sh(t, "", "mkfs.ext4", append(append([]string{"-q", "-F", "-b", "4096"}, g.mkfsOpts...),
		"-E", fmt.Sprintf("offset=%d", g.partStart), raw, fmt.Sprintf("%dk", size/2))...)
	g.path = raw
	if g.format == "qcow2" {
		g.path = filepath.Join(dir, g.name+".qcow2")
		sh(t, "", "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, g.path)
		os.Remove(raw)
	}
	if g.growTo > 0 {
		sh(t, "", "qemu-img", "resize", "-q", "-f", g.format, g.path, fmt.Sprint(g.growTo))
	}
}

// rawView returns a raw image of the disk (the file itself, or a sparse
// conversion of a qcow2).
func (g *guestDisk) rawView(t *testing.T) string {
	t.Helper()
	if g.format != "qcow2" {
		return g.path
	}
	raw := filepath.Join(t.TempDir(), g.name+".raw")
	sh(t, "", "qemu-img", "convert", "-f", "qcow2", "-O", "raw", g.path, raw)
	return raw
}

func sfdiskPart(t *testing.T, path string, pno int) (start, size int64) {
	t.Helper()
	out := sh(t, "", "sfdisk", "--dump", path)
	for _, l := range strings.Split(out, "\n") {
		dev, rest, ok := strings.Cut(l, " : ")
		if !ok || dev != fmt.Sprintf("%s%d", path, pno) {
			continue
		}
		for _, f := range strings.Split(rest, ",") {
			k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			switch strings.TrimSpace(k) {
			case "start":
				start = n
			case "size":
				size = n
			}
		}
		return start, size
	}
	t.Fatalf("sfdisk --dump %s: no partition %d:\n%s", path, pno, out)
	return 0, 0
}

// hostTools returns host programs (under /opt/host/bin in the initramfs)
// and the shared libraries they need (ldd), for guest scripts that run them
// with PATH=/opt/host/bin:$PATH.
func hostTools(t testing.TB, tools ...string) []vmtest.File {
	t.Helper()
	var files []vmtest.File
	libs := map[string]bool{}
	for _, tool := range tools {
		p := testutil.NeedTool(t, tool)[0]
		files = append(files, vmtest.File{Path: "opt/host/bin/" + tool, HostPath: p})
		out, _ := exec.Command("ldd", p).Output() // no output for scripts such as growpart
		for _, f := range strings.Fields(string(out)) {
			if strings.HasPrefix(f, "/") && !strings.HasSuffix(f, ":") {
				libs[f] = true
			}
		}
	}
	var libList []string
	for l := range libs {
		libList = append(libList, l)
	}
	sort.Strings(libList)
	for _, l := range libList {
		files = append(files, vmtest.File{Path: strings.TrimPrefix(l, "/"), HostPath: l})
	}
	return files
}

// hashOutside hashes the disk except partition 1, which the guest mounts
// (mounting writes the ext4 superblock): the tables, the gaps, and any
// partition after it must stay byte for byte the same.
func hashOutside(t *testing.T, g *guestDisk) [32]byte {
	t.Helper()
	start, size := sfdiskPart(t, g.path, 1)
	f, err := os.Open(g.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	h := sha256.New()
	io.Copy(h, io.NewSectionReader(f, 0, start*512))
	io.Copy(h, io.NewSectionReader(f, (start+size)*512, fi.Size()))
	return [32]byte(h.Sum(nil))
}

// e2fsckPartition runs e2fsck -fn on partition 1 of a raw image through a
// read-only loop device.
func e2fsckPartition(t *testing.T, raw string, start, size int64) {
	t.Helper()
	loop := strings.TrimSpace(sh(t, "", "losetup", "-r", "-f", "--show", "-o", fmt.Sprint(start), "--sizelimit", fmt.Sprint(size), raw))
	defer exec.Command("losetup", "-d", loop).Run()
	sh(t, "", "e2fsck", "-fn", loop)
}

const guestCaseScript = `
serial2dev() {
	for b in /sys/block/*; do
		s=$(cat $b/serial $b/device/serial 2>/dev/null | head -n 1 | tr -d ' ')
		if [ "$s" = "$1" ]; then echo ${b##*/}; return; fi
	done
}
part1() { partn $1 1; }
partn() {
	for p in /sys/block/$1/*/partition; do
		if [ "$(cat $p)" = $2 ]; then p=${p%/partition}; echo ${p##*/}; return; fi
	done
}
run_case() {
	name=$1; dev=$2; shift 2
	mp=/mnt/$name
	mkdir -p $mp
	if ! mount -t ext4 $dev $mp; then echo "@@case $name mount-failed"; return; fi
	before=$(df -k $mp | tail -n 1 | awk '{print $2}')
	nixvm-resize --mountpoint $mp "$@" > /tmp/out1 2>&1; rc1=$?
	sed "s|^|[$name 1] |" /tmp/out1
	after=$(df -k $mp | tail -n 1 | awk '{print $2}')
	nixvm-resize --mountpoint $mp "$@" > /tmp/out2 2>&1; rc2=$?
	sed "s|^|[$name 2] |" /tmp/out2
	nixvm-resize --strict --mountpoint $mp > /dev/null 2>&1; rc3=$?
	noop=$(grep -c -e 'nothing to do: ' -e 'nothing touched' /tmp/out2)
	umount $mp
	echo "@@case $name rc1=$rc1 rc2=$rc2 strict=$rc3 before=$before after=$after noop2=$noop"
}
`

// TestGuest grows real partitions and mounted ext4 file systems in a QEMU
// guest (Debian kernel, busybox initramfs), one disk per scenario, and checks
// the disks on the host afterwards with e2fsck -fn, sgdisk -v and sfdisk.
func TestGuest(t *testing.T) {
	testutil.Short(t)
	testutil.NeedRoot(t) // losetup for e2fsck on partitions
	testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img", "busybox", "sfdisk", "sgdisk", "mkfs.ext4", "e2fsck", "losetup")
	kernel, rel := vmtest.Kernel(t)
	dir := t.TempDir()
	disks := []*guestDisk{
		{name: "mbr", label: "dos", script: "start=2048\n", sizeMiB: 64, growTo: 256 * mib, format: "raw", iface: "virtio"},
		{name: "gpt", label: "gpt", script: "start=2048\n", sizeMiB: 64, growTo: 256 * mib, format: "qcow2", iface: "virtio"},
		{name: "nvme", label: "gpt", script: "start=2048\n", sizeMiB: 64, growTo: 256 * mib, format: "raw", iface: "nvme"},
		{name: "notlast", label: "gpt", script: "start=2048,size=32MiB\nstart=67584\n", sizeMiB: 64, growTo: 256 * mib, format: "raw", iface: "virtio"},
		{name: "notgrown", label: "gpt", script: "start=2048\n", sizeMiB: 64, format: "raw", iface: "virtio"},
		// 3 TiB sparse disk with MBR: stops at 2^32 sectors. The ext4 reserves
		// GDT blocks for 2 TiB so the online grow needs no meta_bg conversion.
		{name: "mbr3t", label: "dos", script: "start=2048\n", sizeMiB: 64, growTo: 3 << 40, format: "raw", iface: "virtio",
			mkfsOpts: []string{"-E", "resize=536870912"}},
		{name: "whole", whole: true, sizeMiB: 64, growTo: 256 * mib, format: "raw", iface: "virtio"},
		{name: "dm", label: "gpt", script: "start=2048\n", sizeMiB: 64, growTo: 256 * mib, format: "raw", iface: "virtio", dm: true},
		// A 4Kn disk: the guest's sfdisk writes a GPT in 4096-byte sectors
		// (Debian 12's sfdisk cannot do that on a file).
		{name: "4k", table4k: true, sizeMiB: 256, format: "raw", iface: "virtio"},
		// Images built by nixvm-image from the small Nix fixture, grown
		// with qemu-img resize: 4x (qcow2), and MBR to 3 TiB (sparse raw;
		// the root ext4 has no reserved GDT blocks, so the kernel converts
		// it to meta_bg online).
		{name: "nixlegacy", nix: partition.Legacy, label: "dos", format: "qcow2", iface: "virtio"},
		{name: "nixefi", nix: partition.EFI, part: 2, label: "gpt", format: "qcow2", iface: "virtio"},
		{name: "nixlegacy3t", nix: partition.Legacy, label: "dos", growTo: 3 << 40, format: "raw", iface: "virtio"},
	}
	var script strings.Builder
	script.WriteString(guestCaseScript)
	var vmDisks []vmtest.Disk
	for _, g := range disks {
		g.create(t, dir)
		if g.name == "notlast" || g.name == "notgrown" || g.name == "dm" {
			g.hash = hashOutside(t, g) // (not the 3 TiB one: hashing reads every hole)
		}
		// The guest finds each disk by its serial and partition 1 by
		// sysfs, so no device name is assumed.
		vd := vmtest.Disk{Path: g.path, Format: g.format, Interface: g.iface, Serial: g.name}
		fmt.Fprintf(&script, "disk=$(serial2dev %s); echo \"@@dev %s $disk\"\n", g.name, g.name)
		switch {
		case g.whole:
			fmt.Fprintf(&script, "run_case %s /dev/$disk\n", g.name)
		case g.table4k:
			vd.LogicalBlockSize = 4096
			fmt.Fprintf(&script, "echo \"@@lbs4k $(cat /sys/block/$disk/queue/logical_block_size)\"\n"+
				"printf 'label: gpt\\nstart=256,size=15872\\n' | PATH=/opt/host/bin:$PATH sfdisk -q /dev/$disk\n"+
				"run_case %s /dev/$(part1 $disk)\n"+
				"PATH=/opt/host/bin:$PATH sfdisk -V /dev/$disk; echo \"@@verify4k $?\"\n"+
				"PATH=/opt/host/bin:$PATH sfdisk -d /dev/$disk\n"+
				"echo \"@@part4k $(cat /sys/block/$disk/$(part1 $disk)/start) $(cat /sys/block/$disk/$(part1 $disk)/size)\"\n", g.name)
		case g.dm:
			fmt.Fprintf(&script, "p=$(part1 $disk)\n"+
				"PATH=/opt/host/bin:$PATH dmsetup create --noudevsync nixvmdm --table \"0 $(cat /sys/block/$disk/$p/size) linear /dev/$p 0\"\n"+
				"run_case %s /dev/$(ls /sys/block/$disk/$p/holders)\n"+
				"PATH=/opt/host/bin:$PATH dmsetup remove --noudevsync nixvmdm\n", g.name)
		default:
			fmt.Fprintf(&script, "run_case %s /dev/$(partn $disk %d)\n", g.name, g.rootPart())
		}
		vmDisks = append(vmDisks, vd)
	}
	mods, err := vmtest.Modules(filepath.Join("/lib/modules", rel), "virtio_pci", "virtio_blk", "nvme", "crc32c_generic", "ext4", "dm_mod")
	if err != nil {
		t.Fatal(err)
	}
	initrd := vmtest.Initramfs(t, vmtest.InitramfsConfig{
		Modules: mods,
		Files:   append(hostTools(t, "sfdisk", "dmsetup"), vmtest.File{Path: "bin/nixvm-resize", HostPath: buildResize(t)}),
		Script:  script.String(),
	})
	cfg := vmtest.Config{Kernel: kernel, Initrd: initrd, Disks: vmDisks}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("QEMU command (its files are in t.TempDir, removed after the test):\n  %s", vmtest.ShellQuote(vmtest.Cmdline(cfg)))
		}
	})
	t0 := time.Now()
	out, err := vmtest.Run(context.Background(), cfg, 6*time.Minute)
	t.Logf("guest ran %s; serial output:\n%s", time.Since(t0).Round(time.Millisecond), out)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]map[string]string{}
	for _, m := range vmtest.Markers(out, "case") {
		fields := strings.Fields(m)
		kv := map[string]string{}
		for _, f := range fields[1:] {
			k, v, _ := strings.Cut(f, "=")
			kv[k] = v
		}
		cases[fields[0]] = kv
	}
	kib := func(kv map[string]string, k string) int64 { n, _ := strconv.ParseInt(kv[k], 10, 64); return n }
	for _, g := range disks {
		t.Run(g.name, func(t *testing.T) {
			kv, ok := cases[g.name]
			if !ok {
				t.Fatalf("no result from the guest")
			}
			if kv["rc1"] != "0" || kv["rc2"] != "0" || kv["noop2"] != "1" {
				t.Errorf("guest: %v, want rc1=0 rc2=0 noop2=1 (second run a no-op)", kv)
			}
			raw := g.rawView(t)
			switch g.name {
			case "whole":
				if kv["strict"] != "3" || kib(kv, "after") != kib(kv, "before") {
					t.Errorf("whole disk: --strict exit %s (want 3), df %d -> %d KiB (want unchanged)", kv["strict"], kib(kv, "before"), kib(kv, "after"))
				}
				sh(t, "", "e2fsck", "-fn", raw)
				return
			case "4k":
				if got := vmtest.Markers(out, "lbs4k"); len(got) != 1 || got[0] != "4096" {
					t.Fatalf("guest logical block size: got %q, want 4096 (disk naming?)", got)
				}
				if got := vmtest.Markers(out, "verify4k"); len(got) != 1 || got[0] != "0" {
					t.Errorf("sfdisk -V in the guest: exit %q, want 0", got)
				}
				// 256 MiB = 65536 sectors of 4 KiB; last usable 65530 (4 entry
				// sectors + header); 1 MiB-aligned end 65279.
				got := vmtest.Markers(out, "part4k")
				if want := fmt.Sprintf("%d %d", 256*8, (65279-256+1)*8); len(got) != 1 || got[0] != want {
					t.Fatalf("partition in 512-byte units (sysfs start size): got %q, want %q", got, want)
				}
				partKiB := int64(65279-256+1) * 4
				if a := kib(kv, "after"); a < partKiB*95/100 || a > partKiB {
					t.Errorf("df: %d KiB after, want about %d", a, partKiB)
				}
				e2fsckPartition(t, raw, 1<<20, partKiB*1024)
				return
			case "notlast", "notgrown", "dm":
				if hashOutside(t, g) != g.hash {
					t.Errorf("disk bytes outside the mounted file system changed")
				}
				if kib(kv, "after") != kib(kv, "before") {
					t.Errorf("df: size changed from %d to %d KiB", kib(kv, "before"), kib(kv, "after"))
				}
				wantStrict := map[string]string{"notlast": "3", "notgrown": "0", "dm": "3"}[g.name]
				if kv["strict"] != wantStrict {
					t.Errorf("--strict: exit %s, want %s", kv["strict"], wantStrict)
				}
				return
			}
			start, size := sfdiskPart(t, raw, g.rootPart())
			sectors := g.growTo / 512
			wantEnd := (sectors-33)/2048*2048 - 1 // GPT: 1 MiB-aligned, before the backup
			if g.label == "dos" {
				wantEnd = min(sectors, 1<<32) - 1
			}
			if end := start + size - 1; end != wantEnd {
				t.Errorf("partition 1 ends at %d, want %d", end, wantEnd)
			}
			if g.label == "gpt" {
				if v := sh(t, "", "sgdisk", "-v", raw); !strings.Contains(v, "No problems found") {
					t.Errorf("sgdisk -v:\n%s", v)
				}
			}
			if g.nix != "" {
				sh(t, "", "sfdisk", "--verify", raw) // exits non-zero on a problem
			}
			// df's size is the file system minus its overhead; it must be
			// within 5% of the partition.
			partKiB := size / 2
			if a := kib(kv, "after"); a < partKiB*95/100 || a > partKiB || a <= kib(kv, "before") {
				t.Errorf("df: %d KiB before, %d after, want about the partition's %d KiB", kib(kv, "before"), a, partKiB)
			}
			e2fsckPartition(t, raw, start*512, size*512)
		})
	}
}
