// Package vmtest boots a Linux kernel with a small busybox initramfs in QEMU
// (TCG, no KVM needed) for tests that need a real kernel: online ext4
// growth, BLKPG, device naming (virtio, nvme), and later the image builder's
// VM stage.
//
// The pieces are separate so each can be tested: Modules resolves kernel
// modules with their dependencies through modules.dep (decompressing .ko.xz
// with the xz tool and .ko.zst in Go), BuildInitramfs writes a deterministic
// newc archive with busybox and its applet links, Cmdline is the pure
// function that makes QEMU's argv, and Run boots it with a timeout and
// returns the serial console output. On failure the exact QEMU command is
// printed so the boot can be reproduced by hand.
//
// Environment: NIXVM_VMTEST_KERNEL and NIXVM_VMTEST_QEMU override the kernel
// and the QEMU binary.
package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/cpio"
	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// Disk is a disk attached to the guest.
type Disk struct {
	Path      string
	Format    string // "raw" (default) or "qcow2"
	Interface string // "virtio" (default, /dev/vdX) or "nvme" (/dev/nvmeNn1)
	Serial    string // shown in /sys/block/X/serial (virtio) or X/device/serial (nvme); nvme needs one, "" means "nvme<i>"
	// LogicalBlockSize, when not 0, gives the virtio disk that logical and
	// physical block size (e.g. 4096 for a 4Kn disk).
	LogicalBlockSize int
}

// Config is one QEMU boot.
type Config struct {
	QEMU      string // "" means qemu-system-x86_64
	Kernel    string
	Initrd    string
	Append    string // added to "console=ttyS0 panic=-1 quiet"
	MemoryMiB int    // 0 means 512
	Disks     []Disk
}

// Cmdline returns QEMU's argv (argv[0] included) for cfg. It is pure.
func Cmdline(cfg Config) []string {
	qemu := cfg.QEMU
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	mem := cfg.MemoryMiB
	if mem == 0 {
		mem = 512
	}
	appendLine := "console=ttyS0 panic=-1 quiet"
	if cfg.Append != "" {
		appendLine += " " + cfg.Append
	}
	args := []string{qemu,
		"-machine", "accel=tcg", "-m", fmt.Sprint(mem), "-nographic", "-no-reboot",
		"-nodefaults", "-serial", "stdio",
		"-kernel", cfg.Kernel, "-initrd", cfg.Initrd, "-append", appendLine,
	}
	for i, d := range cfg.Disks {
		format := d.Format
		if format == "" {
			format = "raw"
		}
		switch d.Interface {
		case "nvme":
			serial := d.Serial
			if serial == "" {
				serial = fmt.Sprintf("nvme%d", i)
			}
			args = append(args,
				"-drive", fmt.Sprintf("if=none,id=d%d,format=%s,file=%s", i, format, d.Path),
				"-device", fmt.Sprintf("nvme,drive=d%d,serial=%s", i, serial))
		default:
			// -device for every virtio disk: PCI slots (and so vdX names)
			// follow the command line, which mixing in if=virtio would not.
			dev := fmt.Sprintf("virtio-blk-pci,drive=d%d", i)
			if d.Serial != "" {
				dev += ",serial=" + d.Serial
			}
			if d.LogicalBlockSize != 0 {
				dev += fmt.Sprintf(",logical_block_size=%d,physical_block_size=%d", d.LogicalBlockSize, d.LogicalBlockSize)
			}
			args = append(args,
				"-drive", fmt.Sprintf("if=none,id=d%d,format=%s,file=%s", i, format, d.Path),
				"-device", dev)
		}
	}
	return args
}

// ShellQuote renders argv as a command line a shell runs unchanged.
func ShellQuote(argv []string) string { return vm.ShellQuote(argv) }

// Kernel finds the kernel to boot and its release: NIXVM_VMTEST_KERNEL, else
// the newest /boot/vmlinuz-* that has a /lib/modules directory. It skips the
// test (fails in CI) when there is none.
func Kernel(t testing.TB) (path, release string) {
	t.Helper()
	if p := os.Getenv("NIXVM_VMTEST_KERNEL"); p != "" {
		return p, strings.TrimPrefix(filepath.Base(p), "vmlinuz-")
	}
	cands, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Sort(sort.Reverse(sort.StringSlice(cands)))
	for _, c := range cands {
		rel := strings.TrimPrefix(filepath.Base(c), "vmlinuz-")
		if _, err := os.Stat(filepath.Join("/lib/modules", rel, "modules.dep")); err == nil {
			if f, err := os.Open(c); err == nil {
				f.Close()
				return c, rel
			}
		}
	}
	testutil.Skip(t, "no readable /boot/vmlinuz-* with /lib/modules/<release>/modules.dep (install linux-image-amd64)")
	return "", ""
}

// Module is a kernel module ready for the initramfs (the VM stage's type).
type Module = vm.Module

// Modules resolves names (e.g. "virtio_blk", "ext4") with their dependencies
// through modulesDir/modules.dep, in load order, decompressed: the VM stage's
// resolver, so tests boot with exactly what builds boot with.
func Modules(modulesDir string, names ...string) ([]Module, error) {
	return vm.Modules(modulesDir, names, nil)
}

// File is a host file or literal content placed in the initramfs.
type File struct {
	Path     string // path in the initramfs, e.g. "bin/nixvm-resize"
	HostPath string // copied from here, or
	Data     []byte // this content
	Mode     uint32 // permission bits; 0 means 0755
}

// InitramfsConfig says what goes into an initramfs.
type InitramfsConfig struct {
	Busybox string   // "" means /bin/busybox (Debian busybox-static)
	Script  string   // shell commands run by /init after mounting /proc, /sys, /dev and loading Modules
	Modules []Module // loaded with insmod in this order
	Files   []File
}

const initPrelude = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m || echo "vmtest: insmod $m failed"; done
mdev -s 2>/dev/null
`

const initEpilogue = `
echo "@@vmtest-done"
sync
reboot -f
`

// BuildInitramfs writes an uncompressed newc initramfs to w: busybox with a
// link per applet, the modules, the files, and /init running cfg.Script.
// The same cfg gives the same bytes.
func BuildInitramfs(w io.Writer, cfg InitramfsConfig) error {
	bb := cfg.Busybox
	if bb == "" {
		bb = "/bin/busybox"
	}
	out, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("vmtest: %s --list-full: %w (is it busybox-static?)", bb, err)
	}
	cw := cpio.NewWriter(w)
	dirs := map[string]bool{}
	var mkdirs func(p string) error
	mkdirs = func(p string) error {
		if p == "." || p == "" || dirs[p] {
			return nil
		}
		if err := mkdirs(filepath.Dir(p)); err != nil {
			return err
		}
		dirs[p] = true
		return cw.WriteHeader(&cpio.Header{Name: p, Mode: cpio.TypeDir | 0o755, MTime: 1})
	}
	file := func(name string, mode uint32, data []byte) error {
		if err := mkdirs(filepath.Dir(name)); err != nil {
			return err
		}
		if err := cw.WriteHeader(&cpio.Header{Name: name, Mode: mode, MTime: 1, Size: int64(len(data))}); err != nil {
			return err
		}
		_, err := cw.Write(data)
		return err
	}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"} {
		if err := mkdirs(d); err != nil {
			return err
		}
	}
	if err := cw.WriteHeader(&cpio.Header{Name: "dev/console", Mode: cpio.TypeChar | 0o600, RDevMajor: 5, RDevMinor: 1, MTime: 1}); err != nil {
		return err
	}
	bbData, err := os.ReadFile(bb)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	if err := file("bin/busybox", 0o755, bbData); err != nil {
		return err
	}
	applets := strings.Fields(string(out))
	sort.Strings(applets)
	for _, a := range applets {
		a = strings.TrimPrefix(a, "/")
		if a == "bin/busybox" || a == "init" || a == "linuxrc" {
			continue
		}
		if err := mkdirs(filepath.Dir(a)); err != nil {
			return err
		}
		rel, _ := filepath.Rel(filepath.Dir(a), "bin/busybox")
		if err := cw.WriteHeader(&cpio.Header{Name: a, Mode: cpio.TypeSymlink | 0o777, MTime: 1, Linkname: rel}); err != nil {
			return err
		}
	}
	var order []string
	for _, m := range cfg.Modules {
		if err := file("lib/modules/"+m.Name, 0o644, m.Data); err != nil {
			return err
		}
		order = append(order, m.Name)
	}
	if err := file("etc/modules.order", 0o644, []byte(strings.Join(order, "\n")+"\n")); err != nil {
		return err
	}
	for _, f := range cfg.Files {
		data := f.Data
		if f.HostPath != "" {
			if data, err = os.ReadFile(f.HostPath); err != nil {
				return fmt.Errorf("vmtest: %w", err)
			}
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o755
		}
		if err := file(strings.TrimPrefix(f.Path, "/"), mode, data); err != nil {
			return err
		}
	}
	if err := file("init", 0o755, []byte(initPrelude+cfg.Script+initEpilogue)); err != nil {
		return err
	}
	return cw.Close()
}

// ErrNoDone is returned by Run when the guest did not reach the end of its
// script (crash, panic, timeout).
var ErrNoDone = errors.New("vmtest: guest did not finish its script")

// Run boots cfg, waits at most timeout, and returns the serial output. The
// error names the QEMU command line to reproduce the boot.
func Run(ctx context.Context, cfg Config, timeout time.Duration) (string, error) {
	if q := os.Getenv("NIXVM_VMTEST_QEMU"); q != "" && cfg.QEMU == "" {
		cfg.QEMU = q
	}
	argv := Cmdline(cfg)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.Stdin = nil
	err := cmd.Run()
	s := strings.ReplaceAll(out.String(), "\r\n", "\n")
	if ctx.Err() != nil {
		return s, fmt.Errorf("%w: timeout after %s; reproduce with:\n  %s", ErrNoDone, timeout, ShellQuote(argv))
	}
	if err != nil {
		return s, fmt.Errorf("vmtest: %v; reproduce with:\n  %s", err, ShellQuote(argv))
	}
	if !strings.Contains(s, "@@vmtest-done") {
		return s, fmt.Errorf("%w; reproduce with:\n  %s", ErrNoDone, ShellQuote(argv))
	}
	return s, nil
}

// Markers returns the values of lines "@@KEY VALUE" in out, in order, for
// one key. Guest scripts print them to report results.
func Markers(out, key string) []string {
	var vals []string
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	prefix := "@@" + key
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if i := strings.Index(l, prefix); i >= 0 {
			rest := l[i+len(prefix):]
			if rest == "" || rest[0] == ' ' {
				vals = append(vals, strings.TrimSpace(rest))
			}
		}
	}
	return vals
}
