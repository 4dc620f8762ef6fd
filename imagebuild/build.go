package imagebuild

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// Format is the output container.
type Format string

// The output formats.
const (
	FormatQcow2 Format = "qcow2"
	FormatRaw   Format = "raw"
)

// ParseFormat parses "qcow2" or "raw".
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case FormatQcow2, FormatRaw:
		return f, nil
	}
	return "", fmt.Errorf("%w: got %q, want qcow2 or raw", ErrFormat, s)
}

// Errors, wrapped with details; test with errors.Is. They name the input
// (a path, a size), never a command-line flag: the CLI adds those.
var (
	ErrExist    = errors.New("imagebuild: output exists")
	ErrTooSmall = errors.New("imagebuild: image size too small")
	ErrFormat   = errors.New("imagebuild: unknown output format")
	ErrMissing  = errors.New("imagebuild: store path missing on this machine")
	ErrStoreDir = errors.New("imagebuild: unsupported store directory")
)

// SizeError reports a disk size too small for the closure. It matches
// ErrTooSmall.
type SizeError struct {
	Size int64 // the size asked for
	Min  int64 // the smallest disk that holds the closure
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("%v: %s is too small for this closure (needs at least %s)", ErrTooSmall, units.Bytes(e.Size), units.Bytes(e.Min))
}

// Is makes errors.Is(err, ErrTooSmall) true.
func (e *SizeError) Is(target error) bool { return target == ErrTooSmall }

// Progress receives progress of the long phases. Phase starts a phase of
// total units (bytes); Add reports n more done. nil is off.
type Progress interface {
	Phase(name string, total int64)
	Add(n int64)
}

// Options configure a build. The zero value of each optional field is the
// default.
type Options struct {
	Closure  *nixclosure.Closure // required, validated; its store directory must be /nix/store
	Toplevel string              // the system: profile target and seed of every identifier; required
	Output   string              // required; the manifest goes to Output + ".manifest"
	Force    bool                // replace an existing output

	Layout      partition.Layout // default legacy
	Size        int64            // disk size in bytes; 0 means auto
	ESPSize     int64            // default partition.DefaultESPSize
	Format      Format           // default qcow2
	Compression qcow.Compression // default zstd
	Level       int              // compression level; 0 is the codec's default (zstd 3, as QEMU)
	Workers     int              // default GOMAXPROCS; output bytes do not depend on it
	Epoch       int64            // timestamps outside the store (SOURCE_DATE_EPOCH); default 1, Nix's store mtime

	// Previous is a previous image (or its manifest) whose layout to keep:
	// store paths in both keep their inodes and blocks (see previous.go).
	// "" lays out afresh.
	Previous string

	Log      io.Writer // one line per step; nil discards
	Progress Progress  // nil is off

	// Bootloader, when set, runs on the finished raw disk (laid out as plan,
	// root file system written) before it is packed: the VM stage
	// (imagebuild/vm) that installs the boot loader. nil installs none.
	Bootloader func(ctx context.Context, raw *os.File, plan *partition.Plan) error
}

// Result describes a finished build.
type Result struct {
	Output     string
	Manifest   string
	Paths      int
	Files      uint64
	NarBytes   int64 // bytes of file data streamed
	DiskSize   int64 // virtual disk size
	OutputSize int64 // bytes of the output file
	Digest     [32]byte
	Duration   time.Duration
}

// ManifestPath is where the manifest of the image at output goes.
func ManifestPath(output string) string { return output + ".manifest" }

// CheckOutput fails with ErrExist when output or its manifest exists and
// force is false. Build checks it first; a caller may check it before
// slower work of its own (evaluating the system).
func CheckOutput(output string, force bool) error {
	if force {
		return nil
	}
	for _, p := range []string{output, ManifestPath(output)} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%w: %s", ErrExist, p)
		}
	}
	return nil
}

// Validate checks the options that need no closure: layout, ESP size,
// format, compression and level, size. A caller may check them before
// slower work of its own; Build checks them too.
func (o *Options) Validate() error {
	if o.Format != "" {
		if _, err := ParseFormat(string(o.Format)); err != nil {
			return err
		}
	}
	if err := (qcow.Options{Compression: o.Compression, Level: o.Level}).Validate(); err != nil {
		return err
	}
	if o.Size < 0 {
		return fmt.Errorf("%w: %d bytes", ErrTooSmall, o.Size)
	}
	layout := o.Layout
	if layout == "" {
		layout = partition.Legacy
	}
	_, err := partition.NewPlan(layout, partition.MiB, o.ESPSize)
	return err
}

// headroom is what an auto-sized root file system gets beyond what the
// closure needs, as make-disk-image's additionalSpace: first boot writes
// logs and state before nixvm-resize has grown the disk. It costs nothing in
// a sparse qcow2.
const headroom = 512 << 20

// check validates the options and fills in the defaults.
func (o *Options) check() error {
	if o.Closure == nil || o.Toplevel == "" || o.Output == "" {
		return errors.New("imagebuild: BUG: Closure, Toplevel and Output are required")
	}
	if err := o.Validate(); err != nil {
		return err
	}
	if d := o.Closure.StoreDir; d != "" && d != nixclosure.DefaultStoreDir {
		return fmt.Errorf("%w: %s: images hold their store at %s", ErrStoreDir, d, nixclosure.DefaultStoreDir)
	}
	if o.Closure.Lookup(o.Toplevel) == nil {
		return fmt.Errorf("imagebuild: toplevel %s is not in the closure", o.Toplevel)
	}
	if o.Layout == "" {
		o.Layout = partition.Legacy
	}
	if o.Format == "" {
		o.Format = FormatQcow2
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.Epoch == 0 {
		o.Epoch = 1
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	return nil
}

// Build writes the image. On an error it leaves nothing behind: temporary
// files are removed and an output it was to replace stays as it was.
func Build(ctx context.Context, opts Options) (*Result, error) {
	start := time.Now()
	if err := opts.check(); err != nil {
		return nil, err
	}
	if err := CheckOutput(opts.Output, opts.Force); err != nil {
		return nil, err
	}
	b := &builder{opts: opts, ctx: ctx}
	res, err := b.run()
	if cerr := b.cleanup(); err == nil && cerr != nil {
		return nil, fmt.Errorf("imagebuild: %s is written, but %w", opts.Output, cerr)
	}
	if err != nil {
		return nil, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

type builder struct {
	opts  Options
	ctx   context.Context
	temps []string   // removed at the end; renamed ones are gone by then
	files []*os.File // closed at the end
	trees []*node
	scan  *scanner
	bufs  chan []byte // file data buffers, shared with the NAR hashers

	rawDirty bool // the raw disk has been written to (a retry must clear it)

	prev   *manifest.Layout // the previous layout map kept, if any
	layout *manifest.Layout // this build's layout map
}

// run is the pipeline: scan the store paths, plan the disk, write the root
// file system onto a raw disk, let the VM stage install the boot loader,
// pack the container and manifest, publish both.
func (b *builder) run() (*Result, error) {
	if err := b.loadPrevious(); err != nil {
		return nil, err
	}
	if err := b.scanStore(); err != nil {
		return nil, err
	}
	plan, err := b.planDisk()
	if err != nil {
		return nil, err
	}
	raw, err := b.writeRawDisk(plan)
	if err != nil {
		return nil, err
	}
	if err := b.vmStage(raw, plan); err != nil {
		return nil, err
	}
	img, err := b.pack(raw, plan)
	if err != nil {
		return nil, err
	}
	if err := b.publish(img); err != nil {
		return nil, err
	}
	return &Result{
		Output:     b.opts.Output,
		Manifest:   ManifestPath(b.opts.Output),
		Paths:      len(b.opts.Closure.Paths),
		Files:      b.scan.files,
		NarBytes:   b.scan.bytes,
		DiskSize:   plan.DiskSize,
		OutputSize: img.size,
		Digest:     img.manifest.Digest,
	}, nil
}

// vmStage runs the Bootloader hook on the finished raw disk.
func (b *builder) vmStage(raw *os.File, plan *partition.Plan) error {
	if b.opts.Bootloader == nil {
		b.logf("bootloader: none installed")
		return nil
	}
	return b.opts.Bootloader(b.ctx, raw, plan)
}

func (b *builder) logf(format string, args ...any) {
	fmt.Fprintf(b.opts.Log, format+"\n", args...)
}

// cleanup closes the build's files and removes its temporary files. A
// close error does not matter here: what was published was synced and
// closed before its rename, the rest is deleted. A temporary file that
// cannot be removed is reported.
func (b *builder) cleanup() error {
	for _, f := range b.files {
		f.Close()
	}
	var errs []error
	for _, t := range b.temps {
		if err := os.RemoveAll(t); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove the temporary %s: %w", t, err))
		}
	}
	return errors.Join(errs...)
}

// tempFile creates a temporary file beside the output, so the final rename
// stays within one file system.
func (b *builder) tempFile(suffix string) (*os.File, error) {
	dir, base := filepath.Split(b.opts.Output)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".*"+suffix)
	if err != nil {
		return nil, fmt.Errorf("create a temporary file beside %s: %w", b.opts.Output, err)
	}
	b.temps = append(b.temps, f.Name())
	b.files = append(b.files, f)
	return f, nil
}

// tempDir creates a temporary directory beside the output.
func (b *builder) tempDir(suffix string) (string, error) {
	dir, base := filepath.Split(b.opts.Output)
	if dir == "" {
		dir = "."
	}
	d, err := os.MkdirTemp(dir, "."+base+".*"+suffix)
	if err != nil {
		return "", fmt.Errorf("create a temporary directory beside %s: %w", b.opts.Output, err)
	}
	b.temps = append(b.temps, d)
	return d, nil
}

// seed returns the seed of every identifier: the toplevel's store path, or
// the previous image's lineage.
func (b *builder) seed(what string) []byte {
	h := sha256.Sum256([]byte("nixvm-image " + what + "\x00" + b.lineage()))
	return h[:]
}

func since(t time.Time) string { return time.Since(t).Round(time.Millisecond).String() }
