package main

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/provision"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type provisionOptions struct {
	Image    string
	Guest    string
	Size     string
	Target   string
	Pool     string
	Volume   string
	Overlay  string
	Force    bool
	StoreDir string
	Connect  string
	Quiet    bool
}

func (o *provisionOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Image, "image", "baseline", "image name in the store (or the path of a generation file)")
	fs.StringVar(&o.Guest, "guest", "", "the guest (libvirt domain) the disk is for")
	fs.StringVar(&o.Size, "size", "", "guest disk size (20G, 512M; binary units); default the image's size")
	fs.StringVar(&o.Target, "target", "", "a file or block device to create the disk as")
	fs.StringVar(&o.Pool, "pool", "", "a libvirt storage pool to create the disk in")
	fs.StringVar(&o.Volume, "volume", "", "the volume name with --pool (default guest-GUEST)")
	fs.StringVar(&o.Overlay, "overlay", "", "create a qcow2 overlay at this path")
	fs.BoolVar(&o.Force, "force", false, "recreate an existing disk (refused while it is in use)")
	fs.StringVar(&o.StoreDir, "store-dir", store.DefaultDir, "the image store")
	fs.StringVarP(&o.Connect, "connect", "c", "", "libvirt URI for virsh (default: virsh's own, qemu:///system as root)")
	fs.BoolVarP(&o.Quiet, "quiet", "q", false, "no progress, only the summary line and errors")
}

func init() {
	register(&command{
		name:    "provision",
		summary: "create a guest's disk from the host's current image, unless it exists",
		usage:   "--image NAME --guest GUEST (--target PATH | --pool POOL | --overlay PATH) [flags]",
		help: `Makes GUEST's disk from the current generation of image NAME in this host's
store (` + store.DefaultDir + `/NAME), the way the NixOS host module does
for each guest. An existing disk is never touched: the command says so and
exits 0. --force recreates it, but is refused while it is in use: while a
process (QEMU) holds a lock on it, while domain GUEST runs, or while any
running libvirt domain lists it as a disk. Without virsh on the host only the
lock is checked.

Targets:
  --target FILE        a full copy into a sparse raw file (written beside it
                       and linked into place: never half-written)
  --target /dev/...    a full copy onto a block device; /dev/VG/LV is created
                       with lvcreate when VG exists and LV does not. Every byte
                       past the image's data is zeroed (BLKZEROOUT), so no stale
                       data reaches the guest
  --pool POOL          a full copy into a new raw volume (--volume, default
                       guest-GUEST) of a libvirt pool: virsh vol-create-as,
                       vol-path, pool-refresh
  --overlay FILE       a qcow2 whose backing file is the immutable generation
                       (never 'current'), so later pushes never change the
                       guest's disk under it; made by qemu-img create

Only the image's allocated, non-zero data is written; the guest disk is
--size large (default: the image's size; a block device's own size when it
is larger), and the guest's nixvm-resize grows its root at first boot.

Examples:
  nixvm-image provision --image baseline --guest some-athens-guest --size 50G \
      --target /dev/vg/guest-some-athens-guest
  nixvm-image provision --image baseline --guest web1 --size 20G --pool guests
  nixvm-image provision --image baseline --guest ci1 --size 20G \
      --overlay /var/lib/libvirt/images/ci1.qcow2`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &provisionOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runProvision(ctx, o, c, args) }
		},
	})
}

// findVirsh returns a Virsh when virsh is installed, else nil.
func findVirsh(uri string) *provision.Virsh {
	p, err := exec.LookPath("virsh")
	if err != nil {
		return nil
	}
	return &provision.Virsh{Program: p, URI: uri}
}

func runProvision(ctx context.Context, o *provisionOptions, c Context, args []string) error {
	if len(args) > 0 {
		return usagef("unexpected arguments %q", args)
	}
	req, err := o.request()
	if err != nil {
		return err
	}
	imageSize, err := o.image(&req)
	if err != nil {
		return err
	}
	if req.Virsh = findVirsh(o.Connect); req.Virsh == nil {
		if req.Kind == provision.Pool {
			return fmt.Errorf("--pool needs virsh (libvirt's client), which is not installed here")
		}
		if o.Force && !o.Quiet {
			fmt.Fprintf(c.Stderr, "virsh not found: --force checks only that no process holds a lock on the disk\n")
		}
	}
	var prog *progress
	if total := max(req.Size, imageSize); !o.Quiet && total > 0 {
		prog = newProgress(c.Stderr, isTerminal(c.Stderr))
		prog.Phase("copying", total)
		req.Progress = &absProgress{p: prog}
	}
	start := time.Now()
	res, err := provision.Provision(ctx, req)
	if prog != nil {
		prog.finish()
	}
	if err != nil {
		return o.hint(err)
	}
	o.report(c, req, res, time.Since(start))
	return nil
}

// request turns the flags into a provision request, without its image.
func (o *provisionOptions) request() (provision.Request, error) {
	req := provision.Request{Guest: o.Guest, Force: o.Force, Target: o.Target, Pool: o.Pool, Volume: o.Volume}
	if o.StoreDir != "" {
		req.StateDir = filepath.Join(o.StoreDir, ".provision")
	}
	if o.Guest == "" {
		return req, usagef("--guest is required")
	}
	n := 0
	for _, s := range []string{o.Target, o.Pool, o.Overlay} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return req, usagef("give exactly one of --target, --pool and --overlay")
	}
	if o.Volume != "" && o.Pool == "" {
		return req, usagef("--volume goes with --pool")
	}
	if o.Size != "" {
		size, err := units.ParseSize(o.Size)
		if err != nil {
			return req, usagef("--size: %v", err)
		}
		req.Size = size
	}
	switch {
	case o.Pool != "":
		req.Kind = provision.Pool
		if req.Volume == "" {
			req.Volume = "guest-" + o.Guest
		}
	case o.Overlay != "":
		req.Kind, req.Target = provision.Overlay, o.Overlay
	}
	return req, nil
}

// image puts --image into req: a path as it is, a name as the store's, for
// Provision to resolve to its current generation while it keeps gc away.
// It returns the image's size for the progress bar, when it can tell.
func (o *provisionOptions) image(req *provision.Request) (int64, error) {
	if strings.Contains(o.Image, "/") {
		req.Image = o.Image
		return 0, nil
	}
	if err := store.ValidName(o.Image); err != nil {
		return 0, usageError{fmt.Errorf("--image: %w", err)}
	}
	req.Store, req.Name = &store.Store{Dir: o.StoreDir}, o.Image
	// Provision resolves current again under a store.Use and reports what
	// fails; this look is for the progress bar only.
	if g, err := req.Store.Current(o.Image); err == nil {
		return g.VirtualSize, nil
	}
	return 0, nil
}

// hint adds to a provision error the flag that changes the outcome.
func (o *provisionOptions) hint(err error) error {
	switch {
	case errors.Is(err, store.ErrNoCurrent):
		return fmt.Errorf("--image %s: %w (push one first: nixvm-image push HOST --name %s)", o.Image, err, o.Image)
	case errors.Is(err, store.ErrName), errors.Is(err, store.ErrBusy):
		return fmt.Errorf("--image %s: %w", o.Image, err)
	case errors.Is(err, provision.ErrSize):
		return fmt.Errorf("--size: %w", err)
	case errors.Is(err, provision.ErrInUse), errors.Is(err, provision.ErrUnknownUse):
		return fmt.Errorf("%w (--force never recreates a disk that may be in use)", err)
	case errors.Is(err, provision.ErrPartial):
		return fmt.Errorf("%w; rerun with --force to copy again", err)
	}
	return err
}

// report prints what provision did.
func (o *provisionOptions) report(c Context, req provision.Request, res provision.Result, el time.Duration) {
	if !res.Created {
		fmt.Fprintf(c.Stdout, "%s exists, left untouched (--force recreates it)\n", res.Path)
		return
	}
	if res.Redone {
		fmt.Fprintf(c.Stdout, "%s was left incomplete by a provision cut short: made it again\n", res.Path)
	}
	switch req.Kind {
	case provision.Overlay:
		fmt.Fprintf(c.Stdout, "created %s: qcow2 overlay of %s on %s\n", res.Path, units.Bytes(res.Size), res.Image)
	default:
		fmt.Fprintf(c.Stdout, "created %s: %s disk from %s, %s written, %s zeroed, in %s (%s/s)\n",
			res.Path, units.Bytes(res.Size), res.Image, units.Bytes(res.Written), units.Bytes(res.Zeroed),
			el.Round(time.Millisecond), units.Bytes(int64(float64(res.Written)/max(el.Seconds(), 1e-3))))
	}
}

// absProgress turns provision's "done so far" into progress increments.
type absProgress struct {
	p    *progress
	last int64
}

func (a *absProgress) Update(done int64) {
	if done > a.last {
		a.p.Add(done - a.last)
		a.last = done
	}
}
