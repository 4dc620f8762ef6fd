package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"github.com/nixvm-image/nixvm-image/qcow"
	"github.com/nixvm-image/nixvm-image/store"
)

var (
	// ErrSize reports a guest size smaller than the image or its device.
	ErrSize = errors.New("provision: bad guest disk size")
	// ErrInUse reports that Force was refused because the disk is in use.
	ErrInUse = errors.New("provision: disk is in use")
	// ErrUnknownUse reports that Force was refused because libvirt could
	// not say whether a running domain uses the disk.
	ErrUnknownUse = errors.New("provision: cannot tell whether the disk is in use")
	// ErrPartial reports a device left holding part of a copy.
	ErrPartial = errors.New("provision: partial copy on the device")
	// ErrTarget reports a target that cannot be provisioned.
	ErrTarget = errors.New("provision: bad target")
)

// Kind is the kind of guest disk.
type Kind int

const (
	// File is a full copy into a sparse raw file, or into a block device
	// (also an LVM volume, created when missing) when Target is one.
	File Kind = iota
	// Overlay is a qcow2 whose backing file is the image.
	Overlay
	// Pool is a full copy into a new raw volume of a libvirt pool.
	Pool
)

// Request says which disk to make from which image.
type Request struct {
	// Image is the immutable generation to copy or to back an overlay: a
	// path that later pushes never change (store.Store.Current's Path).
	Image string
	// Name, if set instead of Image, is an image name in Store: Provision
	// takes a store.Use of it, resolves its current generation and keeps
	// gc from removing that generation until the disk is made.
	Name  string
	Store *store.Store
	// Size is the guest disk's size in bytes; 0 means the image's size. A
	// block device's own size wins when it is larger.
	Size int64
	Kind Kind
	// Target is the file, block device (/dev/VG/LV is created with lvcreate
	// when VG exists and LV does not) or overlay path.
	Target string
	// Pool and Volume name the libvirt volume for Kind Pool.
	Pool, Volume string
	// Force recreates an existing disk unless it is in use.
	Force bool
	// Guest is the libvirt domain the disk is for: Force is refused while it runs.
	Guest string
	// Virsh checks domains and manages pools; nil skips the libvirt checks
	// (a host without libvirt) and cannot do Kind Pool.
	Virsh *Virsh
	// Run runs lvcreate, lvremove and qemu-img; nil means ExecRunner.
	Run Runner
	// QemuImg is the qemu-img program; "" means "qemu-img".
	QemuImg string
	// Progress, if set, gets the bytes of the guest disk done.
	Progress Updater
	// StateDir holds the records of disks being copied in place (block
	// devices, LVM and pool volumes), so a run cut short is found and
	// redone; "" means ".provision" in Store's directory (or the default
	// store's).
	StateDir string
}

// Result says what Provision did.
type Result struct {
	Path    string // the disk's path (a pool volume's vol-path)
	Created bool   // false: the disk existed and was left untouched
	Redone  bool   // the disk was left incomplete by a run cut short, and made again
	Size    int64  // the guest disk's size
	Image   string // the generation it was made from
	CopyStats
}

// Provision makes the disk that req describes unless it exists.
func Provision(ctx context.Context, req Request) (res Result, err error) {
	if req.Name != "" {
		if req.Store == nil {
			return Result{}, fmt.Errorf("%w: image name %q without a store", ErrTarget, req.Name)
		}
		u, err := req.Store.Use(ctx, req.Name)
		if err != nil {
			return Result{}, err
		}
		defer func() { err = errors.Join(err, u.Release()) }()
		g, err := u.Current()
		if err != nil {
			return Result{}, err
		}
		req.Image = g.Path
	}
	res, err = provision(ctx, req)
	res.Image = req.Image
	return res, err
}

// provision makes the disk from req.Image.
func provision(ctx context.Context, req Request) (Result, error) {
	if req.Image == "" {
		return Result{}, fmt.Errorf("%w: no image", ErrTarget)
	}
	if req.Size < 0 {
		return Result{}, fmt.Errorf("%w: got %d", ErrSize, req.Size)
	}
	switch req.Kind {
	case Pool:
		return provisionPool(ctx, req)
	case Overlay:
		return provisionOverlay(ctx, req)
	case File:
		if req.Target == "" {
			return Result{}, fmt.Errorf("%w: no target path", ErrTarget)
		}
		if isBlockDevice(req.Target) {
			return provisionDevice(ctx, req, false)
		}
		if _, err := os.Lstat(req.Target); err == nil {
			return existing(ctx, req, req.Target, func() (Result, error) { return provisionFile(ctx, req) })
		}
		if vg, lv, ok := lvmPath(req.Target); ok {
			return provisionLV(ctx, req, vg, lv)
		}
		if strings.HasPrefix(filepath.Clean(req.Target), "/dev/") {
			return Result{}, fmt.Errorf("%w: %s does not exist, and only /dev/VG/LV (an LVM volume) is created when missing", ErrTarget, req.Target)
		}
		return provisionFile(ctx, req)
	}
	return Result{}, fmt.Errorf("%w: kind %d", ErrTarget, req.Kind)
}

// existing handles a disk that exists: left alone, or recreated by again
// under Force, or when a run cut short left it incomplete, once checkFree
// says nothing uses it.
func existing(ctx context.Context, req Request, path string, again func() (Result, error)) (Result, error) {
	inc, err := incomplete(req)
	if err != nil {
		return Result{Path: path}, err
	}
	if !req.Force && !inc {
		return Result{Path: path}, nil
	}
	if err := checkFree(ctx, req, path); err != nil {
		if inc {
			err = fmt.Errorf("%w: %s was left incomplete by a provision cut short; it must be made again, but: %w", ErrPartial, path, err)
		}
		return Result{Path: path}, err
	}
	res, err := again()
	res.Redone = inc
	return res, err
}

// checkFree fails with ErrInUse when path is locked by a process (QEMU), when
// req.Guest is a running domain, or when a running domain lists path.
func checkFree(ctx context.Context, req Request, path string) error {
	if isBlockDevice(path) {
		f, err := openBlockExclusive(path, os.O_RDONLY)
		if err != nil {
			return err
		}
		f.Close()
	}
	locked, err := lockHolder(path)
	if err != nil {
		return err
	}
	if locked {
		return fmt.Errorf("%w: %s is locked by another process (a running QEMU?); stop the guest first", ErrInUse, path)
	}
	if req.Virsh == nil {
		return nil
	}
	running, err := req.Virsh.Domains(ctx, false)
	if err != nil {
		return fmt.Errorf("%w: %s: listing running domains: %w", ErrUnknownUse, path, err)
	}
	want := canonical(path)
	for _, d := range running {
		if d == req.Guest {
			return fmt.Errorf("%w: domain %s is running; stop it first (virsh shutdown %s)", ErrInUse, d, d)
		}
		disks, err := req.Virsh.DomainDisks(ctx, d)
		if err != nil {
			return fmt.Errorf("%w: %s: listing the disks of running domain %s: %w", ErrUnknownUse, path, d, err)
		}
		for _, s := range disks {
			if canonical(s) == want {
				return fmt.Errorf("%w: running domain %s uses %s; stop it first (virsh shutdown %s)", ErrInUse, d, path, d)
			}
		}
	}
	return nil
}

// canonical resolves symlinks where it can (so /dev/VG/LV matches /dev/dm-3).
func canonical(p string) string {
	if r, err := filepath.EvalSymlinks(p); err == nil {
		return r
	}
	return filepath.Clean(p)
}

func openImage(path string) (*os.File, image.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("provision: opening image %s: %w", path, err)
	}
	return f, img, nil
}

func guestSize(req Request, img image.Image) (int64, error) {
	if req.Size == 0 {
		return img.Size(), nil
	}
	if req.Size < img.Size() {
		return 0, fmt.Errorf("%w: size %d bytes is smaller than the image's %d bytes; give at least that", ErrSize, req.Size, img.Size())
	}
	return req.Size, nil
}

// provisionFile writes a sparse raw copy to a temp file beside Target and
// links it into place (Force: renames over it).
func provisionFile(ctx context.Context, req Request) (Result, error) {
	src, img, err := openImage(req.Image)
	if err != nil {
		return Result{}, err
	}
	defer src.Close()
	defer img.Close()
	size, err := guestSize(req, img)
	if err != nil {
		return Result{}, err
	}
	res := Result{Path: req.Target, Size: size}
	err = writeTemp(req.Target, req.Force, func(f *os.File) error {
		if err := f.Truncate(size); err != nil {
			return err
		}
		res.CopyStats, err = Copy(ctxWriter{ctx, f}, img, size, nil, req.Progress)
		return err
	})
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return Result{Path: req.Target}, nil // made meanwhile by someone else: not ours to touch
		}
		return Result{Path: req.Target}, err
	}
	res.Created = true
	return res, nil
}

// writeTemp fills a temp file in path's directory, syncs it and puts it at
// path: with a hard link that fails if path exists (no clobbering), or by
// rename when replace is set. No temp file is left behind.
func writeTemp(path string, replace bool, fill func(*os.File) error) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	err = f.Chmod(0o600)
	if err == nil {
		err = fill(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if replace {
		err = os.Rename(tmp, path)
	} else {
		err = os.Link(tmp, path)
	}
	if err != nil {
		return err
	}
	return fsutil.SyncDir(dir)
}

// ctxWriter stops a long copy when ctx is cancelled.
type ctxWriter struct {
	ctx context.Context
	f   *os.File
}

func (w ctxWriter) WriteAt(p []byte, off int64) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := w.f.WriteAt(p, off)
	if crashHook != nil {
		crashHook()
	}
	return n, err
}

// copyInto copies the image into an existing file or device at path, in
// place: a device's whole length beyond the data is zeroed.
func copyInto(ctx context.Context, req Request, path string) (Result, error) {
	src, img, err := openImage(req.Image)
	if err != nil {
		return Result{}, err
	}
	defer src.Close()
	defer img.Close()
	var f *os.File
	if isBlockDevice(path) { // held exclusively for the copy: no mount can start
		f, err = openBlockExclusive(path, os.O_RDWR)
	} else {
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	if err != nil {
		return Result{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Result{}, err
	}
	var zero func(off, n int64) error
	size, err := guestSize(req, img)
	if err != nil {
		return Result{}, err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		devSize, err := deviceSize(f)
		if err != nil {
			return Result{}, err
		}
		if devSize < size {
			return Result{}, fmt.Errorf("%w: device %s has %d bytes, want at least %d", ErrSize, path, devSize, size)
		}
		size = devSize
		zero = func(off, n int64) error {
			if err := ctx.Err(); err != nil {
				return err
			}
			return zeroDevice(f, off, n)
		}
	} else if fi.Size() < size {
		if err := f.Truncate(size); err != nil {
			return Result{}, err
		}
	} else {
		size = fi.Size()
	}
	res := Result{Path: path, Size: size, Created: true}
	res.CopyStats, err = Copy(ctxWriter{ctx, f}, img, size, zero, req.Progress)
	if err == nil {
		err = f.Sync()
	}
	return res, err
}

// provisionDevice copies onto an existing block device: only under Force
// (or created, when this run made it).
func provisionDevice(ctx context.Context, req Request, created bool) (Result, error) {
	if !created {
		return existing(ctx, req, req.Target, func() (Result, error) { return provisionDevice(ctx, req, true) })
	}
	f, err := openBlockExclusive(req.Target, os.O_RDONLY) // refused before it is marked
	if err != nil {
		return Result{}, err
	}
	f.Close()
	if err := markIncomplete(req); err != nil {
		return Result{}, err
	}
	res, err := copyInto(ctx, req, req.Target)
	if err != nil {
		return res, fmt.Errorf("%w: %s now holds part of the image and must not be booted (the next run makes it again): %v", ErrPartial, req.Target, err)
	}
	return res, markComplete(req)
}

// lvmPath splits /dev/VG/LV when /dev/VG is a volume group's directory or
// the VG exists (vgs is asked by provisionLV).
func lvmPath(p string) (vg, lv string, ok bool) {
	rest, found := strings.CutPrefix(filepath.Clean(p), "/dev/")
	if !found {
		return "", "", false
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 2 || parts[0] == "" || parts[1] == "" || parts[0] == "mapper" || parts[0] == "disk" {
		return "", "", false
	}
	return parts[0], parts[1], true
}

// provisionLV creates LV in VG with lvcreate, copies onto it, and removes it
// again when the copy fails.
func provisionLV(ctx context.Context, req Request, vg, lv string) (Result, error) {
	src, img, err := openImage(req.Image)
	if err != nil {
		return Result{}, err
	}
	size, err := guestSize(req, img)
	img.Close()
	src.Close()
	if err != nil {
		return Result{}, err
	}
	mib := (size + (1<<20 - 1)) >> 20
	if err := markIncomplete(req); err != nil {
		return Result{}, err
	}
	if _, err := req.Run.run(ctx, "lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y",
		"--size", strconv.FormatInt(mib, 10)+"m", "--name", lv, vg); err != nil {
		return Result{}, errors.Join(fmt.Errorf("%w: creating LVM volume %s: %w", ErrTarget, req.Target, err), markComplete(req))
	}
	remove := func(res Result, err error) (Result, error) {
		if _, rerr := req.Run.run(context.WithoutCancel(ctx), "lvremove", "--yes", vg+"/"+lv); rerr != nil {
			return res, fmt.Errorf("%w: %s holds part of the image and could not be removed (%v): %v; remove it (lvremove %s/%s), or rerun to copy again", ErrPartial, req.Target, rerr, err, vg, lv)
		}
		return Result{}, errors.Join(err, markComplete(req))
	}
	if !waitBlockDevice(ctx, req.Target) {
		return remove(Result{}, fmt.Errorf("%w: lvcreate made %s/%s but %s never appeared as a block device (is udev running?); removed it again", ErrTarget, vg, lv, req.Target))
	}
	res, err := copyInto(ctx, req, req.Target)
	if err != nil {
		return remove(res, fmt.Errorf("provision: copying onto %s (removed again): %w", req.Target, err))
	}
	return res, markComplete(req)
}

// provisionOverlay makes a qcow2 overlay whose backing file is the resolved
// generation path. It runs qemu-img create: every libvirt host has it,
// it writes exactly the header QEMU expects (backing format extension
// included) and checks that the backing file opens.
func provisionOverlay(ctx context.Context, req Request) (Result, error) {
	if req.Target == "" {
		return Result{}, fmt.Errorf("%w: no overlay path", ErrTarget)
	}
	if _, err := os.Lstat(req.Target); err == nil {
		if !req.Force {
			return Result{Path: req.Target}, nil
		}
		if err := checkFree(ctx, req, req.Target); err != nil {
			return Result{Path: req.Target}, err
		}
	}
	backing, err := filepath.EvalSymlinks(req.Image)
	if err != nil {
		return Result{}, err
	}
	if backing, err = filepath.Abs(backing); err != nil {
		return Result{}, err
	}
	src, img, err := openImage(backing)
	if err != nil {
		return Result{}, err
	}
	if img.Type() != "qcow2" {
		img.Close()
		src.Close()
		return Result{}, fmt.Errorf("%w: overlay backing %s is %s, want qcow2", ErrTarget, backing, img.Type())
	}
	size, err := guestSize(req, img)
	img.Close()
	src.Close()
	if err != nil {
		return Result{}, err
	}
	qemuImg := req.QemuImg
	if qemuImg == "" {
		qemuImg = "qemu-img"
	}
	err = writeTemp(req.Target, req.Force, func(f *os.File) error {
		_, err := req.Run.run(ctx, qemuImg, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", f.Name(), strconv.FormatInt(size, 10))
		return err
	})
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return Result{Path: req.Target}, nil
		}
		return Result{}, err
	}
	return Result{Path: req.Target, Created: true, Size: size}, nil
}

// provisionPool creates a raw volume in a libvirt pool and copies into it.
func provisionPool(ctx context.Context, req Request) (Result, error) {
	v := req.Virsh
	if v == nil {
		return Result{}, fmt.Errorf("%w: a pool volume needs virsh", ErrTarget)
	}
	if req.Pool == "" || req.Volume == "" {
		return Result{}, fmt.Errorf("%w: pool and volume names are required", ErrTarget)
	}
	path, err := v.VolPath(ctx, req.Pool, req.Volume)
	redone := false
	switch {
	case err == nil:
		inc, err := incomplete(req)
		if err != nil {
			return Result{Path: path}, err
		}
		if !req.Force && !inc {
			return Result{Path: path}, nil
		}
		if err := checkFree(ctx, req, path); err != nil {
			return Result{Path: path}, err
		}
		if err := v.VolDelete(ctx, req.Pool, req.Volume); err != nil {
			return Result{Path: path}, err
		}
		redone = inc
	case !errors.Is(err, ErrNoVolume):
		return Result{}, err
	}
	src, img, err := openImage(req.Image)
	if err != nil {
		return Result{}, err
	}
	size, err := guestSize(req, img)
	img.Close()
	src.Close()
	if err != nil {
		return Result{}, err
	}
	ptype, err := v.PoolType(ctx, req.Pool)
	if err != nil {
		return Result{}, err
	}
	sparse := ptype == "dir" || ptype == "fs" || ptype == "netfs"
	if err := markIncomplete(req); err != nil {
		return Result{}, err
	}
	if err := v.VolCreate(ctx, req.Pool, req.Volume, size, sparse); err != nil {
		return Result{}, errors.Join(err, markComplete(req))
	}
	path, err = v.VolPath(ctx, req.Pool, req.Volume)
	var res Result
	if err == nil {
		res, err = copyInto(ctx, req, path)
	}
	if err != nil {
		bg := context.WithoutCancel(ctx)
		if derr := v.VolDelete(bg, req.Pool, req.Volume); derr != nil {
			return res, fmt.Errorf("%w: volume %s of pool %s holds part of the image and could not be deleted (%v): %v; delete it (virsh vol-delete --pool %s %s), or rerun to copy again", ErrPartial, req.Volume, req.Pool, derr, err, req.Pool, req.Volume)
		}
		return Result{}, errors.Join(fmt.Errorf("provision: copying into volume %s of pool %s (deleted again): %w", req.Volume, req.Pool, err), markComplete(req))
	}
	if err := markComplete(req); err != nil {
		return res, err
	}
	res.Redone = redone
	if err := v.PoolRefresh(ctx, req.Pool); err != nil {
		return res, err
	}
	return res, nil
}
