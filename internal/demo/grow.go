// Package demo holds the engine of `make demo`'s growth step
// (scripts/demo-grow): it copies a built image onto a larger disk the way a
// host provisions a guest (qemu-img convert, then qemu-img resize), boots a
// QEMU TCG guest (the host's Debian kernel and a busybox initramfs carrying
// nixvm-resize, see internal/busyboxvm) that mounts the file system labelled
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
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/busyboxvm"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
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
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	res := &GrowResult{}
	var err error
	if res.BuiltSize, err = opts.copyGrown(ctx); err != nil {
		return nil, err
	}
	res.GrownSize = opts.Factor * res.BuiltSize
	dir, err := os.MkdirTemp("", "nixvm-demo-grow-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	cfg, err := opts.guest(dir)
	if err != nil {
		return nil, err
	}
	res.QEMU = busyboxvm.Cmdline(cfg)
	if opts.Command != nil {
		opts.Command(res.QEMU)
	}
	res.Serial, err = busyboxvm.Run(ctx, cfg, opts.Timeout)
	res.Transcript = transcript(res.Serial)
	if err != nil {
		return res, err
	}
	return res, res.report()
}

func (o *GrowOptions) defaults() error {
	if o.Image == "" || o.Output == "" || o.Resize == "" {
		return errors.New("demo: BUG: Image, Output and Resize are required")
	}
	if o.Factor == 0 {
		o.Factor = 4
	}
	if o.Factor < 1 {
		return fmt.Errorf("demo: factor %d: want at least 1", o.Factor)
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	return nil
}

// run runs a host command, told to o.Command first, and returns its output.
func (o *GrowOptions) run(ctx context.Context, argv ...string) ([]byte, error) {
	if o.Command != nil {
		o.Command(argv)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("demo: %s: %v: %s", shquote.Join(argv), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// copyGrown copies the image to the output as qcow2, as a host provisions a
// guest, grows it Factor times, and returns the image's virtual size.
func (o *GrowOptions) copyGrown(ctx context.Context) (int64, error) {
	out, err := o.run(ctx, "qemu-img", "info", "--output=json", o.Image)
	if err != nil {
		return 0, err
	}
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return 0, fmt.Errorf("demo: qemu-img info %s: %w", o.Image, err)
	}
	if err := os.Remove(o.Output); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("demo: %w", err)
	}
	if _, err := o.run(ctx, "qemu-img", "convert", "-f", info.Format, "-O", "qcow2", o.Image, o.Output); err != nil {
		return 0, err
	}
	if _, err := o.run(ctx, "qemu-img", "resize", "-q", "-f", "qcow2", o.Output, strconv.FormatInt(o.Factor*info.VirtualSize, 10)); err != nil {
		return 0, err
	}
	return info.VirtualSize, nil
}

// guest writes the initramfs into dir and returns the boot of the grown
// disk.
func (o *GrowOptions) guest(dir string) (busyboxvm.Config, error) {
	kernel, release, err := busyboxvm.FindKernel(o.Kernel)
	if err != nil {
		return busyboxvm.Config{}, err
	}
	mods, err := busyboxvm.Modules(filepath.Join("/lib/modules", release), "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
	if err != nil {
		return busyboxvm.Config{}, err
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		return busyboxvm.Config{}, err
	}
	err = busyboxvm.BuildInitramfs(f, busyboxvm.InitramfsConfig{
		Modules: mods,
		Files:   []busyboxvm.File{{Path: "bin/nixvm-resize", HostPath: o.Resize}},
		Script:  guestScript,
	})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return busyboxvm.Config{}, err
	}
	return busyboxvm.Config{Kernel: kernel, Initrd: initrd, Disks: []busyboxvm.Disk{{Path: o.Output, Format: "qcow2"}}}, nil
}

// transcript is the guest's "| " lines: df -h, nixvm-resize, df -h.
func transcript(serial string) string {
	var lines []string
	for _, l := range strings.Split(serial, "\n") {
		if t, ok := strings.CutPrefix(strings.TrimSpace(l), "| "); ok {
			lines = append(lines, t)
		} else if strings.TrimSpace(l) == "|" {
			lines = append(lines, "")
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// report reads the guest's markers into r and checks that it grew.
func (r *GrowResult) report() error {
	if e := busyboxvm.Markers(r.Serial, "demo-error"); len(e) > 0 {
		return fmt.Errorf("%w: %s", ErrGuest, e[0])
	}
	before, after := busyboxvm.Markers(r.Serial, "demo-before"), busyboxvm.Markers(r.Serial, "demo-after")
	if len(before) != 1 || len(after) != 1 {
		return fmt.Errorf("%w: no report from the guest", ErrGuest)
	}
	r.BeforeKiB, _ = strconv.ParseInt(before[0], 10, 64)
	var rc string
	if f := strings.Fields(after[0]); len(f) == 2 {
		rc = f[0]
		r.AfterKiB, _ = strconv.ParseInt(f[1], 10, 64)
	}
	if rc != "0" {
		return fmt.Errorf("%w: nixvm-resize exited with status %s", ErrGuest, rc)
	}
	if r.Factor() > 1 && r.AfterKiB <= r.BeforeKiB {
		return fmt.Errorf("%w: df: got %d KiB after, want more than %d", ErrGuest, r.AfterKiB, r.BeforeKiB)
	}
	return nil
}

// Factor is the grown disk's size over the built one's.
func (r *GrowResult) Factor() int64 {
	if r.BuiltSize == 0 {
		return 0
	}
	return r.GrownSize / r.BuiltSize
}
