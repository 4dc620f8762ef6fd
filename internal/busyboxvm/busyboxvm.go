// Package busyboxvm boots a Linux kernel with a small busybox initramfs in
// QEMU (TCG, no KVM needed) and returns what the guest printed: the engine of
// `make demo`'s growth step (internal/demo) and of the tests that need a real
// kernel (testkit/vmtest wraps it for them).
//
// The pieces are separate so each can be tested: FindKernel finds the host's
// kernel, Modules resolves kernel modules with their dependencies through
// modules.dep (the VM stage's resolver: .ko.xz with the xz tool, .ko.zst in
// Go), BuildInitramfs writes a deterministic newc archive with busybox and
// its applet links, Cmdline is the pure function that makes QEMU's argv, and
// Run boots it with a timeout and returns the serial console output. On
// failure the error carries the exact QEMU command so the boot can be
// reproduced by hand. Guest scripts report results as marker lines
// "@@KEY VALUE" (Markers).
//
// Limits: x86_64 guests, qemu-system-x86_64 and a static busybox (Debian's
// busybox-static) on the host. This package does not link package testing.
package busyboxvm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
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
		args = append(args, d.args(i)...)
	}
	return args
}

// args are the -drive and -device arguments of the disk at index i.
func (d Disk) args(i int) []string {
	format := d.Format
	if format == "" {
		format = "raw"
	}
	drive := fmt.Sprintf("if=none,id=d%d,format=%s,file=%s", i, format, d.Path)
	if d.Interface == "nvme" {
		serial := d.Serial
		if serial == "" {
			serial = fmt.Sprintf("nvme%d", i)
		}
		return []string{"-drive", drive, "-device", fmt.Sprintf("nvme,drive=d%d,serial=%s", i, serial)}
	}
	// -device for every virtio disk: PCI slots (and so vdX names) follow
	// the command line, which mixing in if=virtio would not.
	dev := fmt.Sprintf("virtio-blk-pci,drive=d%d", i)
	if d.Serial != "" {
		dev += ",serial=" + d.Serial
	}
	if d.LogicalBlockSize != 0 {
		dev += fmt.Sprintf(",logical_block_size=%d,physical_block_size=%d", d.LogicalBlockSize, d.LogicalBlockSize)
	}
	return []string{"-drive", drive, "-device", dev}
}

// ErrNoKernel is returned by FindKernel when the host has no usable kernel.
var ErrNoKernel = errors.New("busyboxvm: no kernel to boot")

// FindKernel returns the kernel to boot and its release: want, else
// NIXVM_VMTEST_KERNEL, else the newest readable /boot/vmlinuz-* that has a
// /lib/modules/<release>/modules.dep.
func FindKernel(want string) (path, release string, err error) {
	if want == "" {
		want = os.Getenv("NIXVM_VMTEST_KERNEL")
	}
	if want != "" {
		return want, strings.TrimPrefix(filepath.Base(want), "vmlinuz-"), nil
	}
	cands, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Sort(sort.Reverse(sort.StringSlice(cands)))
	for _, c := range cands {
		rel := strings.TrimPrefix(filepath.Base(c), "vmlinuz-")
		if _, err := os.Stat(filepath.Join("/lib/modules", rel, "modules.dep")); err != nil {
			continue
		}
		if f, err := os.Open(c); err == nil {
			f.Close()
			return c, rel, nil
		}
	}
	return "", "", fmt.Errorf("%w: no readable /boot/vmlinuz-* with /lib/modules/<release>/modules.dep: install linux-image-amd64 or set NIXVM_VMTEST_KERNEL", ErrNoKernel)
}

// Module is a kernel module ready for the initramfs (the VM stage's type).
type Module = vm.Module

// Modules resolves names (e.g. "virtio_blk", "ext4") with their dependencies
// through modulesDir/modules.dep, in load order, decompressed: the VM stage's
// resolver, so these guests boot with exactly what builds boot with.
func Modules(modulesDir string, names ...string) ([]Module, error) {
	return vm.Modules(modulesDir, names, nil)
}

// ErrNoDone is returned by Run when the guest did not reach the end of its
// script (crash, panic, timeout).
var ErrNoDone = errors.New("busyboxvm: guest did not finish its script")

// Run boots cfg, waits at most timeout, and returns the serial output. The
// error names the QEMU command line to reproduce the boot.
// NIXVM_VMTEST_QEMU overrides cfg.QEMU when that is empty.
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
		return s, fmt.Errorf("%w: timeout after %s; reproduce with:\n  %s", ErrNoDone, timeout, shquote.Join(argv))
	}
	if err != nil {
		return s, fmt.Errorf("busyboxvm: %v; reproduce with:\n  %s", err, shquote.Join(argv))
	}
	if !strings.Contains(s, doneMarker) {
		return s, fmt.Errorf("%w; reproduce with:\n  %s", ErrNoDone, shquote.Join(argv))
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
