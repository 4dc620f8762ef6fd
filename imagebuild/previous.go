package imagebuild

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
)

// Layout-stable rebuilds (Options.Previous).
//
// The ext4 writer groups the root file system into placement units: ""
// (the journal, /, lost+found, /nix and /nix/store), one per store path
// (named by its base name, e.g. "abc…-bash-5.2") and one per entry outside
// the store ("/nix/var/nix/db/db.sqlite", "/etc/NIXOS", …). The manifest's
// layout map records where each unit's inodes and blocks went. A build with
// a previous layout map
//
//   - keeps the previous disk size, partition plan and identifiers (the
//     lineage: partition IDs, file system UUID and hash seed all derive
//     from the first generation's toplevel), so the metadata that need not
//     change does not;
//   - passes the units that are in the new image to the ext4 writer as
//     hints: a store path present in both keeps its inode numbers and all
//     of its blocks, so its blocks are byte for byte the same;
//   - lets new store paths take the lowest free inodes and blocks, which
//     are first the ones removed store paths left (their old contents are
//     overwritten, or zero in the fresh raw disk where nothing new lands).
//
// When the previous layout cannot be used (another partition layout or
// size, a closure too big for the previous file system, a layout map that
// does not fit the geometry, free space running out while writing) the
// build says why in its log and lays out afresh.

// ErrPrevious reports a previous image or manifest that cannot be read.
var ErrPrevious = errors.New("imagebuild: previous layout")

// loadPrevious reads the layout map of Options.Previous: a manifest, or an
// image with its manifest beside it, or an image alone (its ext4 metadata).
func (b *builder) loadPrevious() error {
	p := b.opts.Previous
	if p == "" {
		return nil
	}
	src := p
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPrevious, err)
	}
	defer f.Close()
	var magic [8]byte
	n, _ := io.ReadFull(f, magic[:])
	if !bytes.Equal(magic[:n], []byte("NIXVMMAN")) {
		// An image: its manifest beside it, else its own metadata.
		mf, err := os.Open(ManifestPath(p))
		if err != nil {
			l, rerr := b.layoutFromImage(f)
			if rerr != nil {
				return fmt.Errorf("%w: %s has no manifest beside it (%s) and its file system could not be read: %w", ErrPrevious, p, ManifestPath(p), rerr)
			}
			b.prev = l
			b.logf("previous layout: read from the file system of %s (%d units)", p, len(l.Units))
			return nil
		}
		defer mf.Close()
		f, src = mf, ManifestPath(p)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	m, err := manifest.Read(f)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrPrevious, src, err)
	}
	if m.Layout == nil {
		b.logf("previous layout: %s has no layout map (written by an older nixvm-image); laying out afresh", src)
		return nil
	}
	b.prev = m.Layout
	b.logf("previous layout: %s (%d units)", src, len(m.Layout.Units))
	return nil
}

// lineage is what identifiers derive from: the previous image's lineage,
// else the toplevel's base name.
func (b *builder) lineage() string {
	if b.prev != nil && b.prev.Lineage != "" {
		return b.prev.Lineage
	}
	return path.Base(b.opts.Toplevel)
}

// keepPlan returns the previous image's partition plan when this build can
// keep it, else plan (auto or Options.Size) and drops the previous layout, saying
// why.
func (b *builder) keepPlan(plan *partition.Plan, minFS int64) (*partition.Plan, error) {
	l := b.prev
	if l == nil {
		return plan, nil
	}
	afresh := func(format string, args ...any) (*partition.Plan, error) {
		b.logf("previous layout not used: "+format+"; laying out afresh", args...)
		b.prev = nil
		return plan, nil
	}
	if minFS > l.RootSize {
		return afresh("free space runs short: the previous root file system has %s, this closure needs at least %s (the new disk is %s)", units.Bytes(l.RootSize), units.Bytes(minFS), units.Bytes(plan.DiskSize))
	}
	kept, err := partition.NewPlan(b.opts.Layout, l.RootSize, b.opts.ESPSize)
	if err != nil {
		return afresh("%v", err)
	}
	if kept.Root.Start != l.RootOffset || kept.Root.Size != l.RootSize {
		return afresh("the previous root file system (%s at offset %s) does not match layout %s (%s at offset %s)", units.Bytes(l.RootSize), units.Bytes(l.RootOffset), b.opts.Layout, units.Bytes(kept.Root.Size), units.Bytes(kept.Root.Start))
	}
	if b.opts.Size != 0 && kept.DiskSize != b.opts.Size {
		return afresh("the disk size asked for (%s) differs from the previous disk (%s)", units.Bytes(b.opts.Size), units.Bytes(kept.DiskSize))
	}
	if err := b.ext4Options(l.RootSize).Validate(); err != nil {
		return afresh("its layout map does not fit its file system: %v", err)
	}
	return kept, nil
}

// previousPlacements are the hints for the ext4 writer: the previous
// units that this build writes again.
func (b *builder) previousPlacements() map[string]ext4.Placement {
	if b.prev == nil {
		return nil
	}
	present := map[string]bool{}
	for _, p := range b.opts.Closure.Paths {
		present[path.Base(p.Path)] = true
	}
	out := map[string]ext4.Placement{}
	for _, u := range b.prev.Units {
		if u.Name == "" || strings.HasPrefix(u.Name, "/") || present[u.Name] {
			out[u.Name] = ext4.Placement{Inodes: toExt4(u.Inodes), Blocks: toExt4(u.Blocks)}
		}
	}
	return out
}

func toExt4(rs []manifest.Run) []ext4.Range {
	out := make([]ext4.Range, len(rs))
	for i, r := range rs {
		out[i] = ext4.Range{Start: r.Start, Len: r.Len}
	}
	return out
}

// layoutMap is the manifest's record of where this build put each unit.
func (b *builder) layoutMap(plan *partition.Plan, opts ext4.Options, ps map[string]ext4.Placement) *manifest.Layout {
	l := &manifest.Layout{
		RootOffset: plan.Root.Start,
		RootSize:   plan.Root.Size,
		Lineage:    b.lineage(),
		UUID:       opts.UUID,
		HashSeed:   opts.HashSeed,
	}
	for name, p := range ps {
		u := manifest.Unit{Name: name}
		for _, r := range p.Inodes {
			u.Inodes = append(u.Inodes, manifest.Run{Start: r.Start, Len: r.Len})
		}
		for _, r := range p.Blocks {
			u.Blocks = append(u.Blocks, manifest.Run{Start: r.Start, Len: r.Len})
		}
		l.Units = append(l.Units, u)
	}
	sort.Slice(l.Units, func(i, j int) bool { return l.Units[i].Name < l.Units[j].Name })
	return l
}

// unitOf is the placement unit of an entry written outside the store.
func unitOf(name string) string { return "/" + name }
