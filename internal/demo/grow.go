// Package demo holds the engine of `make demo`'s growth step
// (scripts/demo-grow): it copies a built image onto a larger disk the way a
// host provisions a guest (qemu-img convert, then qemu-img resize), boots a
// QEMU TCG guest (the host's Debian kernel and a busybox initramfs carrying
// nixvm-resize, see testkit/vmtest) that mounts the file system labelled
// nixos, runs df -h, nixvm-resize and df -h again, and returns what the
// guest printed.
//
// Limits: x86_64 hosts with qemu-system-x86_64 and busybox-static; the
// guest mounts the root file system at /mnt (the busybox initramfs is its
// /), so nixvm-resize runs with --mountpoint /mnt.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// ErrGuest is returned when the guest did not grow the file system.
var ErrGuest = errors.New("demo: the guest did not grow the root file system")

// GrowOptions configure Grow. The zero value of each optional field is the
// default.
type GrowOptions struct {
	Image  string // the built image (qcow2 or raw); required
	Output string // the grown qcow2 to write; required, replaced if it exists
	Resize string // a static nixvm-resize binary (CGO_ENABLED=0); required

	Factor  int64         // the grown disk is Factor times the image's virtual size; default 4
	Kernel  string        // default NIXVM_VMTEST_KERNEL, else the newest /boot/vmlinuz-* with modules
	Timeout time.Duration // for the guest; default 5 minutes
	// Command, when not nil, is told each host command before it runs.
	Command func(argv []string)
}

// GrowResult is what the guest reported.
type GrowResult struct {
	BuiltSize, GrownSize int64  // virtual disk sizes in bytes
	BeforeKiB, AfterKiB  int64  // df's size of the root file system
	Transcript           string // the guest's lines: df -h, nixvm-resize, df -h
	Serial               string // the whole serial output
	QEMU                 []string
}

const guestScript = `
root=
for i in $(seq 100); do root=$(findfs LABEL=nixos 2>/dev/null) && break; sleep 0.1; done
if [ -z "$root" ]; then echo "@@demo-error no file system labelled nixos"; else
mount -t ext4 "$root" /mnt || echo "@@demo-error cannot mount $root"
kib() { df -k /mnt | tail -n 1 | awk '{print $2}'; }
echo "@@demo-before $(kib)"
echo "| # df -h /mnt        (before; the guest's root file system is $root)"
df -h /mnt | sed 's/^/| /'
echo "| # nixvm-resize --mountpoint /mnt"
nixvm-resize --mountpoint /mnt > /tmp/out 2>&1; rc=$?
sed 's/^/| /' /tmp/out
echo "| # df -h /mnt        (after)"
df -h /mnt | sed 's/^/| /'
echo "@@demo-after $rc $(kib)"
umount /mnt
fi
`

// Grow writes the grown copy of opts.Image to opts.Output and boots the
// guest that grows it.
func Grow(ctx context.Context, opts GrowOptions) (*GrowResult, error) {
	if opts.Image == "" || opts.Output == "" || opts.Resize == "" {
		return nil, errors.New("demo: BUG: Image, Output and Resize are required")
	}
	if opts.Factor == 0 {
		opts.Factor = 4
	}
	if opts.Factor < 1 {
		return nil, fmt.Errorf("demo: factor %d: want at least 1", opts.Factor)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Minute
	}
	run := func(argv ...string) ([]byte, error) {
		if opts.Command != nil {
			opts.Command(argv)
		}
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("demo: %s: %v: %s", vmtest.ShellQuote(argv), err, strings.TrimSpace(stderr.String()))
		}
		return out, nil
	}
	res := &GrowResult{}
	out, err := run("qemu-img", "info", "--output=json", opts.Image)
	if err != nil {
		return nil, err
	}
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("demo: qemu-img info %s: %w", opts.Image, err)
	}
	res.BuiltSize, res.GrownSize = info.VirtualSize, opts.Factor*info.VirtualSize
	os.Remove(opts.Output)
	if _, err := run("qemu-img", "convert", "-f", info.Format, "-O", "qcow2", opts.Image, opts.Output); err != nil {
		return nil, err
	}
	if _, err := run("qemu-img", "resize", "-q", "-f", "qcow2", opts.Output, strconv.FormatInt(res.GrownSize, 10)); err != nil {
		return nil, err
	}

	kernel, release, err := findKernel(opts.Kernel)
	if err != nil {
		return nil, err
	}
	mods, err := vmtest.Modules(filepath.Join("/lib/modules", release), "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "nixvm-demo-grow-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	initrd := filepath.Join(dir, "initrd.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		return nil, err
	}
	err = vmtest.BuildInitramfs(f, vmtest.InitramfsConfig{
		Modules: mods,
		Files:   []vmtest.File{{Path: "bin/nixvm-resize", HostPath: opts.Resize}},
		Script:  guestScript,
	})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	cfg := vmtest.Config{Kernel: kernel, Initrd: initrd, Disks: []vmtest.Disk{{Path: opts.Output, Format: "qcow2"}}}
	res.QEMU = vmtest.Cmdline(cfg)
	if opts.Command != nil {
		opts.Command(res.QEMU)
	}
	res.Serial, err = vmtest.Run(ctx, cfg, opts.Timeout)
	var lines []string
	for _, l := range strings.Split(res.Serial, "\n") {
		if t, ok := strings.CutPrefix(strings.TrimSpace(l), "| "); ok {
			lines = append(lines, t)
		} else if strings.TrimSpace(l) == "|" {
			lines = append(lines, "")
		}
	}
	res.Transcript = strings.Join(lines, "\n") + "\n"
	if err != nil {
		return res, err
	}
	if e := vmtest.Markers(res.Serial, "demo-error"); len(e) > 0 {
		return res, fmt.Errorf("%w: %s", ErrGuest, e[0])
	}
	before, after := vmtest.Markers(res.Serial, "demo-before"), vmtest.Markers(res.Serial, "demo-after")
	if len(before) != 1 || len(after) != 1 {
		return res, fmt.Errorf("%w: no report from the guest", ErrGuest)
	}
	res.BeforeKiB, _ = strconv.ParseInt(before[0], 10, 64)
	var rc string
	if f := strings.Fields(after[0]); len(f) == 2 {
		rc = f[0]
		res.AfterKiB, _ = strconv.ParseInt(f[1], 10, 64)
	}
	if rc != "0" {
		return res, fmt.Errorf("%w: nixvm-resize exited with status %s", ErrGuest, rc)
	}
	if res.Factor() > 1 && res.AfterKiB <= res.BeforeKiB {
		return res, fmt.Errorf("%w: df: got %d KiB after, want more than %d", ErrGuest, res.AfterKiB, res.BeforeKiB)
	}
	return res, nil
}

// Factor is the grown disk's size over the built one's.
func (r *GrowResult) Factor() int64 {
	if r.BuiltSize == 0 {
		return 0
	}
	return r.GrownSize / r.BuiltSize
}

// findKernel returns the kernel to boot and its release: want, else
// NIXVM_VMTEST_KERNEL, else the newest /boot/vmlinuz-* that has a
// /lib/modules directory.
func findKernel(want string) (string, string, error) {
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
		if _, err := os.Stat(filepath.Join("/lib/modules", rel, "modules.dep")); err == nil {
			return c, rel, nil
		}
	}
	return "", "", errors.New("demo: no /boot/vmlinuz-* with /lib/modules/<release>/modules.dep: install linux-image-amd64 or set NIXVM_VMTEST_KERNEL")
}
