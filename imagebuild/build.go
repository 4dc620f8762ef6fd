package imagebuild

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/nixdb"
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

// Errors.
var (
	ErrExist    = errors.New("imagebuild: output exists")
	ErrTooSmall = errors.New("imagebuild: image size too small")
)

// Progress receives progress of the long phases. Phase starts a phase of
// total units (bytes); Add reports n more done. nil is off.
type Progress interface {
	Phase(name string, total int64)
	Add(n int64)
}

// Options configure a build. The zero value of each optional field is the
// default.
type Options struct {
	Closure  *nixclosure.Closure // required, validated
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

// headroom is what an auto-sized root file system gets beyond what the
// closure needs, as make-disk-image's additionalSpace: first boot writes
// logs and state before nixvm-resize has grown the disk. It costs nothing in
// a sparse qcow2.
const headroom = 512 << 20

func (o *Options) check() error {
	if o.Closure == nil || o.Toplevel == "" || o.Output == "" {
		return errors.New("imagebuild: BUG: Closure, Toplevel and Output are required")
	}
	if o.Layout == "" {
		o.Layout = partition.Legacy
	}
	if o.Format == "" {
		o.Format = FormatQcow2
	}
	if o.Format != FormatQcow2 && o.Format != FormatRaw {
		return fmt.Errorf("imagebuild: unknown format %q: want qcow2 or raw", o.Format)
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
	if o.Closure.Lookup(o.Toplevel) == nil {
		return fmt.Errorf("imagebuild: toplevel %s is not in the closure", o.Toplevel)
	}
	return nil
}

// Build writes the image.
func Build(ctx context.Context, opts Options) (*Result, error) {
	start := time.Now()
	if err := opts.check(); err != nil {
		return nil, err
	}
	if !opts.Force {
		for _, p := range []string{opts.Output, ManifestPath(opts.Output)} {
			if _, err := os.Lstat(p); err == nil {
				return nil, fmt.Errorf("%w: %s; pass --force to replace it", ErrExist, p)
			}
		}
	}
	b := &builder{opts: opts, ctx: ctx}
	res, err := b.run()
	b.cleanup()
	if err != nil {
		return nil, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

type builder struct {
	opts  Options
	ctx   context.Context
	temps []string // removed at the end, renamed ones are gone by then
	trees []*node
	scan  *scanner
	bufs  chan []byte // file data buffers, shared with the NAR hashers

	rawDirty bool // the raw disk has been written to (a retry must clear it)

	prev   *manifest.Layout // the previous layout map kept, if any
	layout *manifest.Layout // this build's layout map
}

func (b *builder) logf(format string, args ...any) {
	fmt.Fprintf(b.opts.Log, format+"\n", args...)
}

func (b *builder) cleanup() {
	for _, t := range b.temps {
		os.Remove(t)
	}
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
	return f, nil
}

// seed returns the seed of every identifier: the toplevel's store path, or
// the previous image's lineage.
func (b *builder) seed(what string) []byte {
	h := sha256.Sum256([]byte("nixvm-image " + what + "\x00" + b.lineage()))
	return h[:]
}

func (b *builder) run() (*Result, error) {
	o := &b.opts
	c := o.Closure

	if err := b.loadPrevious(); err != nil {
		return nil, err
	}

	// 1. Scan every store path.
	t0 := time.Now()
	b.scan = newScanner()
	for _, p := range c.Paths {
		if err := b.ctx.Err(); err != nil {
			return nil, err
		}
		t, err := b.scan.scan(p.Path)
		if err != nil {
			if os.IsNotExist(err) {
				return nil, fmt.Errorf("store path %s is missing on this machine: realise it first (nix-store --realise %s) or build where it exists", p.Path, p.Path)
			}
			return nil, fmt.Errorf("scan %s: %w", p.Path, err)
		}
		b.trees = append(b.trees, t)
	}
	s := b.scan
	b.logf("scanned %d store paths: %d files, %s of data (%s)", len(c.Paths), s.files, units.Bytes(s.bytes), since(t0))

	// 2. Plan sizes. The database is written after the store (it needs the
	// NAR hashes); budget generously for it.
	t0 = time.Now()
	planner := ext4.NewPlanner(b.ext4Options(0))
	for _, d := range b.skeleton() {
		planner.Add(d)
	}
	for i, p := range c.Paths {
		walkHeaders(b.trees[i], p.Path, func(_ *node, _ string, hdr *ext4.Header) error {
			planner.Add(hdr)
			return nil
		})
	}
	// The database is written after the store (it needs the NAR hashes):
	// budget generously for it, and a little for the files outside the
	// store.
	dbBytes := int64(len(c.Paths))*2048 + 256<<10
	usage := planner.Usage()
	usage.Inodes += 32
	usage.Blocks += blocksFor(dbBytes) + 32
	minFS := ext4.MinSize(usage)
	rootSize := minFS + minFS/10 + headroom
	plan, err := partition.NewPlan(o.Layout, rootSize, o.ESPSize)
	if err != nil {
		return nil, err
	}
	if o.Size != 0 {
		minPlan, err := partition.NewPlan(o.Layout, minFS, o.ESPSize)
		if err != nil {
			return nil, err
		}
		if o.Size < minPlan.DiskSize {
			return nil, fmt.Errorf("%w: --size %s is too small for this closure (needs at least %s); use --size auto", ErrTooSmall, units.Bytes(o.Size), units.Bytes(minPlan.DiskSize))
		}
		plan, err = partition.NewPlan(o.Layout, o.Size-(minPlan.DiskSize-minPlan.Root.Size), o.ESPSize)
		if err != nil {
			return nil, err
		}
		for plan.DiskSize > o.Size {
			plan, err = partition.NewPlan(o.Layout, plan.Root.Size-partition.MiB, o.ESPSize)
			if err != nil {
				return nil, err
			}
		}
	}
	if plan, err = b.keepPlan(plan, minFS); err != nil {
		return nil, err
	}
	b.logf("layout %s: disk %s, root file system %s at offset %s (%s)", o.Layout, units.Bytes(plan.DiskSize), units.Bytes(plan.Root.Size), units.Bytes(plan.Root.Start), since(t0))

	// 3. The raw disk.
	raw, err := b.tempFile(".raw")
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	if err := raw.Truncate(plan.DiskSize); err != nil {
		return nil, fmt.Errorf("size the raw disk: %w", err)
	}
	t0 = time.Now()
	if err := b.writeDisk(raw, plan); err != nil {
		if !errors.Is(err, ext4.ErrNoSpace) || b.prev == nil {
			return nil, err
		}
		b.logf("previous layout not used: free space ran short while keeping it (%v); laying out afresh", err)
		b.prev = nil
		if err := b.writeDisk(raw, plan); err != nil {
			return nil, err
		}
	}
	b.logf("wrote the root file system: %s of files, NAR hashes checked (%s)", units.Bytes(s.bytes), since(t0))
	if o.Bootloader != nil {
		if err := o.Bootloader(b.ctx, raw, plan); err != nil {
			return nil, err
		}
	} else {
		b.logf("bootloader: none installed")
	}

	// 4. The container and the manifest, in one pass over the raw disk.
	var out *os.File
	hasher := manifest.NewHasher(plan.DiskSize, o.Workers)
	var qw *qcow.Writer
	sinks := []writerAt{hasher}
	if o.Format == FormatQcow2 {
		out, err = b.tempFile(".tmp")
		if err != nil {
			return nil, err
		}
		defer out.Close()
		qw, err = qcow.NewWriter(out, plan.DiskSize, qcow.Options{Compression: o.Compression, Level: o.Level, Workers: o.Workers})
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, qw)
	}
	if o.Progress != nil {
		o.Progress.Phase("pack "+string(o.Format), plan.DiskSize)
	}
	t0 = time.Now()
	if err := copySparse(b.ctx, raw, plan.DiskSize, sinks, o.Progress); err != nil {
		return nil, err
	}
	if qw != nil {
		if err := qw.Close(); err != nil {
			return nil, err
		}
		b.logf("packed qcow2 (%s compression) and block manifest (%s)", o.Compression, since(t0))
	} else {
		out = raw
		b.logf("hashed the raw disk for the block manifest (%s)", since(t0))
	}
	m, err := hasher.Finish()
	if err != nil {
		return nil, err
	}
	t0 = time.Now()
	if err := out.Sync(); err != nil {
		return nil, err
	}
	b.logf("synced %s to disk (%s)", o.Output, since(t0))
	fi, err := out.Stat()
	if err != nil {
		return nil, err
	}

	// 5. Publish: manifest beside the image, both by rename.
	mf, err := b.tempFile(".manifest.tmp")
	if err != nil {
		return nil, err
	}
	defer mf.Close()
	m.Layout = b.layout
	if _, err := m.WriteTo(mf); err != nil {
		return nil, fmt.Errorf("write manifest: %w", err)
	}
	if err := mf.Sync(); err != nil {
		return nil, err
	}
	if err := os.Chmod(out.Name(), 0o644); err != nil {
		return nil, err
	}
	if err := os.Chmod(mf.Name(), 0o644); err != nil {
		return nil, err
	}
	os.Remove(ManifestPath(o.Output)) // never leave an old manifest beside a new image
	if err := os.Rename(out.Name(), o.Output); err != nil {
		return nil, fmt.Errorf("publish %s: %w", o.Output, err)
	}
	if err := os.Rename(mf.Name(), ManifestPath(o.Output)); err != nil {
		return nil, fmt.Errorf("publish %s: %w", ManifestPath(o.Output), err)
	}
	syncDir(filepath.Dir(o.Output))
	return &Result{
		Output:     o.Output,
		Manifest:   ManifestPath(o.Output),
		Paths:      len(c.Paths),
		Files:      s.files,
		NarBytes:   s.bytes,
		DiskSize:   plan.DiskSize,
		OutputSize: fi.Size(),
		Digest:     m.Digest,
	}, nil
}

func since(t time.Time) string { return time.Since(t).Round(time.Millisecond).String() }

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// ext4Options are the root file system's options; identifiers derive from
// the toplevel, times from the epoch.
func (b *builder) ext4Options(size int64) ext4.Options {
	var uuid, hashSeed [16]byte
	copy(uuid[:], b.seed("ext4 uuid"))
	copy(hashSeed[:], b.seed("ext4 hash seed"))
	uuid[6] = uuid[6]&0x0f | 0x40
	uuid[8] = uuid[8]&0x3f | 0x80
	if b.prev != nil {
		uuid, hashSeed = b.prev.UUID, b.prev.HashSeed
	}
	return ext4.Options{Size: size, Label: "nixos", UUID: uuid, HashSeed: hashSeed, Time: b.opts.Epoch, Previous: b.previousPlacements()}
}

// skeleton lists the directories outside the store paths: the first three
// come before the store, the rest after it.
func (b *builder) skeleton() []*ext4.Header {
	var hs []*ext4.Header
	for _, d := range []struct {
		name      string
		mode, gid uint32
	}{
		{".", 0o755, 0},
		{"nix", 0o755, 0},
		{"nix/store", 0o1775, 30000}, // root:nixbld, as Nix makes it
		{"nix/var", 0o755, 0},
		{"nix/var/nix", 0o755, 0},
		{"nix/var/nix/db", 0o755, 0},
		{"nix/var/nix/profiles", 0o755, 0},
		{"nix/var/nix/gcroots", 0o755, 0},
		{"etc", 0o755, 0},
		{"bin", 0o755, 0},
	} {
		hs = append(hs, &ext4.Header{Name: d.name, Type: ext4.TypeDir, Mode: d.mode, Gid: d.gid, Mtime: b.opts.Epoch})
	}
	return hs
}

// writeDisk writes the partition table, the ESP and the root file system
// on the raw disk, which it zeroes first.
func (b *builder) writeDisk(raw *os.File, plan *partition.Plan) error {
	if b.rawDirty {
		// A retry: the writers rely on a zero-filled disk. Punch the old
		// bytes out rather than truncating to zero, after which ext4
		// (auto_da_alloc) would force the whole new file to disk on close.
		if err := unix.Fallocate(int(raw.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, plan.DiskSize); err != nil {
			if err := raw.Truncate(0); err != nil {
				return fmt.Errorf("clear the raw disk: %w", err)
			}
		}
	}
	b.rawDirty = true
	if err := raw.Truncate(plan.DiskSize); err != nil {
		return fmt.Errorf("size the raw disk: %w", err)
	}
	ids := partition.DeriveIDs(b.seed("partition"))
	if err := plan.WriteTable(raw, ids); err != nil {
		return err
	}
	if err := plan.WriteESP(raw, ids); err != nil {
		return err
	}
	return b.writeRoot(raw, plan)
}

// writeRoot writes the root file system into its partition.
func (b *builder) writeRoot(raw *os.File, plan *partition.Plan) error {
	o := &b.opts
	c := o.Closure
	opts := b.ext4Options(plan.Root.Size)
	w, err := ext4.NewWriter(io.NewOffsetWriter(raw, plan.Root.Start), opts)
	if err != nil {
		return err
	}
	epoch := o.Epoch
	for _, h := range b.skeleton()[:3] {
		if err := w.WriteHeader(h); err != nil {
			return err
		}
	}
	if o.Progress != nil {
		o.Progress.Phase("write store", b.scan.bytes)
	}
	b.bufs = newBufferPool(8, 1<<20)
	dbPaths := make([]nixdb.Path, 0, len(c.Paths))
	for i, p := range c.Paths {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		if err := w.BeginUnit(path.Base(p.Path)); err != nil {
			return err
		}
		hash, size, err := b.writeStorePath(w, p.Path, b.trees[i])
		if err != nil {
			return err
		}
		if p.NarHash != "" && p.NarHash != hash {
			return fmt.Errorf("%w: %s: NAR hash: got %s, want %s (the closure description does not match the store: rebuild it, or run nix-store --verify --check-contents)", nixclosure.ErrHashMismatch, p.Path, hash, p.NarHash)
		}
		if p.NarSize != 0 && p.NarSize != size {
			return fmt.Errorf("%w: %s: NAR size: got %d, want %d", nixclosure.ErrHashMismatch, p.Path, size, p.NarSize)
		}
		dbPaths = append(dbPaths, nixdb.Path{Path: p.Path, NarHash: hash, NarSize: size, Deriver: p.Deriver, References: p.References})
	}

	// The Nix database, profile and the files NixOS tools expect.
	dbFile, err := b.tempFile(".db")
	if err != nil {
		return err
	}
	dbFile.Close()
	os.Remove(dbFile.Name()) // nixdb.Write creates it
	if err := nixdb.Write(dbFile.Name(), dbPaths, epoch); err != nil {
		return fmt.Errorf("write the Nix database: %w", err)
	}
	db, err := os.ReadFile(dbFile.Name())
	if err != nil {
		return err
	}
	for _, h := range b.skeleton()[3:] {
		if err := w.BeginUnit(unitOf(h.Name)); err != nil {
			return err
		}
		if err := w.WriteHeader(h); err != nil {
			return err
		}
	}
	file := func(name string, data []byte, mode uint32) error {
		if err := w.BeginUnit(unitOf(name)); err != nil {
			return err
		}
		if err := w.WriteHeader(&ext4.Header{Name: name, Type: ext4.TypeReg, Mode: mode, Mtime: epoch, Size: int64(len(data))}); err != nil {
			return err
		}
		_, err := w.Write(data)
		return err
	}
	symlink := func(name, target string) error {
		if err := w.BeginUnit(unitOf(name)); err != nil {
			return err
		}
		return w.WriteHeader(&ext4.Header{Name: name, Type: ext4.TypeSymlink, Mode: 0o777, Mtime: epoch, Linkname: target})
	}
	if err := file("nix/var/nix/db/db.sqlite", db, 0o644); err != nil {
		return err
	}
	if err := file("nix/var/nix/db/schema", []byte(fmt.Sprint(nixdb.SchemaVersion)), 0o644); err != nil {
		return err
	}
	if err := symlink("nix/var/nix/profiles/system-1-link", o.Toplevel); err != nil {
		return err
	}
	if err := symlink("nix/var/nix/profiles/system", "system-1-link"); err != nil {
		return err
	}
	if err := file("etc/NIXOS", nil, 0o644); err != nil {
		return err
	}
	if err := symlink("bin/sh", b.binsh()); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	b.layout = b.layoutMap(plan, opts, w.Placements())
	return nil
}

// binsh is the target of /bin/sh, which switch-to-configuration needs in the
// chroot: the store path that the system's sw/bin/sh resolves to, else the
// profile's.
func (b *builder) binsh() string {
	p := b.opts.Toplevel + "/sw/bin/sh"
	for range 16 {
		t, err := os.Readlink(p)
		if err != nil {
			break
		}
		if !path.IsAbs(t) {
			t = path.Join(path.Dir(p), t)
		}
		p = t
	}
	if b.inClosure(p) {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/nix/var/nix/profiles/system/sw/bin/sh"
}

func (b *builder) inClosure(p string) bool {
	dir := b.opts.Closure.StoreDir
	if !strings.HasPrefix(p, dir+"/") {
		return false
	}
	top := p[:len(dir)+1+strings.IndexByte(p[len(dir)+1:]+"/", '/')]
	return b.opts.Closure.Lookup(top) != nil
}
