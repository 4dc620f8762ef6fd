package imagebuild

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/nixdb"
	"github.com/nixvm-image/nixvm-image/partition"
)

// writeRawDisk is the third phase: the partition table, the ESP and the
// root file system on a sparse raw disk beside the output. When keeping the
// previous layout runs out of free space, it lays out afresh once.
func (b *builder) writeRawDisk(plan *partition.Plan) (*os.File, error) {
	raw, err := b.tempFile(".raw")
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
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
	b.logf("wrote the root file system: %s of files, NAR hashes checked (%s)", units.Bytes(b.scan.bytes), since(t0))
	return raw, nil
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

// writeRoot writes the root file system into its partition: the
// directories above the store, the store paths, then what needs their NAR
// hashes (the Nix database) and the rest of the system's files.
func (b *builder) writeRoot(raw *os.File, plan *partition.Plan) error {
	opts := b.ext4Options(plan.Root.Size)
	w, err := ext4.NewWriter(io.NewOffsetWriter(raw, plan.Root.Start), opts)
	if err != nil {
		return err
	}
	for _, h := range b.skeleton()[:3] {
		if err := w.WriteHeader(h); err != nil {
			return err
		}
	}
	dbPaths, err := b.writeStore(w)
	if err != nil {
		return err
	}
	db, err := b.nixDatabase(dbPaths)
	if err != nil {
		return err
	}
	if err := b.writeSystem(w, db); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	b.layout = b.layoutMap(plan, opts, w.Placements())
	return nil
}

// writeStore streams every store path into the file system, checks its
// NAR hash and size against the closure's, and returns the paths as the
// Nix database lists them.
func (b *builder) writeStore(w *ext4.Writer) ([]nixdb.Path, error) {
	c := b.opts.Closure
	if b.opts.Progress != nil {
		b.opts.Progress.Phase("write store", b.scan.bytes)
	}
	b.bufs = newBufferPool(8, 1<<20)
	dbPaths := make([]nixdb.Path, 0, len(c.Paths))
	for i, p := range c.Paths {
		if err := b.ctx.Err(); err != nil {
			return nil, err
		}
		if err := w.BeginUnit(path.Base(p.Path)); err != nil {
			return nil, err
		}
		hash, size, err := b.writeStorePath(w, p.Path, b.trees[i])
		if err != nil {
			return nil, err
		}
		if err := checkNar(p, hash, size); err != nil {
			return nil, err
		}
		dbPaths = append(dbPaths, nixdb.Path{Path: p.Path, NarHash: hash, NarSize: size, Deriver: p.Deriver, References: p.References})
	}
	return dbPaths, nil
}

// checkNar compares a path's NAR hash and size, as written, with what the
// closure description says (when it says).
func checkNar(p nixclosure.PathInfo, hash string, size uint64) error {
	if p.NarHash != "" && p.NarHash != hash {
		return fmt.Errorf("%w: %s: NAR hash: got %s, want %s (the closure description does not match the store: rebuild it, or run nix-store --verify --check-contents)", nixclosure.ErrHashMismatch, p.Path, hash, p.NarHash)
	}
	if p.NarSize != 0 && p.NarSize != size {
		return fmt.Errorf("%w: %s: NAR size: got %d, want %d", nixclosure.ErrHashMismatch, p.Path, size, p.NarSize)
	}
	return nil
}

// nixDatabase returns the bytes of the image's Nix database, written by
// nixdb in a temporary directory beside the output.
func (b *builder) nixDatabase(paths []nixdb.Path) ([]byte, error) {
	dir, err := b.tempDir(".db")
	if err != nil {
		return nil, err
	}
	name := filepath.Join(dir, "db.sqlite")
	if err := nixdb.Write(name, paths, b.opts.Epoch); err != nil {
		return nil, fmt.Errorf("write the Nix database: %w", err)
	}
	return os.ReadFile(name)
}

// systemEntry is a file or symlink outside the store.
type systemEntry struct {
	name   string
	data   []byte // a regular file's content
	target string // a symlink's target ("" for a regular file)
}

// writeSystem writes the directories after the store, the Nix database,
// the system profile and the files NixOS tools expect, each a placement
// unit of its own.
func (b *builder) writeSystem(w *ext4.Writer, db []byte) error {
	for _, h := range b.skeleton()[3:] {
		if err := w.BeginUnit(unitOf(h.Name)); err != nil {
			return err
		}
		if err := w.WriteHeader(h); err != nil {
			return err
		}
	}
	for _, e := range []systemEntry{
		{name: "nix/var/nix/db/db.sqlite", data: db},
		{name: "nix/var/nix/db/schema", data: []byte(fmt.Sprint(nixdb.SchemaVersion))},
		{name: "nix/var/nix/profiles/system-1-link", target: b.opts.Toplevel},
		{name: "nix/var/nix/profiles/system", target: "system-1-link"},
		{name: "etc/NIXOS", data: nil},
		{name: "bin/sh", target: b.binsh()},
	} {
		if err := b.writeSystemEntry(w, e); err != nil {
			return err
		}
	}
	return nil
}

func (b *builder) writeSystemEntry(w *ext4.Writer, e systemEntry) error {
	if err := w.BeginUnit(unitOf(e.name)); err != nil {
		return err
	}
	if e.target != "" {
		return w.WriteHeader(&ext4.Header{Name: e.name, Type: ext4.TypeSymlink, Mode: 0o777, Mtime: b.opts.Epoch, Linkname: e.target})
	}
	if err := w.WriteHeader(&ext4.Header{Name: e.name, Type: ext4.TypeReg, Mode: 0o644, Mtime: b.opts.Epoch, Size: int64(len(e.data))}); err != nil {
		return err
	}
	_, err := w.Write(e.data)
	return err
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
	dir := nixclosure.DefaultStoreDir // check makes sure the closure's is
	if !strings.HasPrefix(p, dir+"/") {
		return false
	}
	top := p[:len(dir)+1+strings.IndexByte(p[len(dir)+1:]+"/", '/')]
	return b.opts.Closure.Lookup(top) != nil
}
