package imagebuild

import (
	"time"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/partition"
)

// planDisk is the second phase: it sizes the root file system from the
// scanned trees and lays out the disk, automatically, at Options.Size, or
// as the previous image was.
func (b *builder) planDisk() (*partition.Plan, error) {
	t0 := time.Now()
	usage, err := b.usage()
	if err != nil {
		return nil, err
	}
	minFS := ext4.MinSize(usage)
	plan, err := b.sizedPlan(minFS)
	if err != nil {
		return nil, err
	}
	if plan, err = b.keepPlan(plan, minFS); err != nil {
		return nil, err
	}
	b.logf("layout %s: disk %s, root file system %s at offset %s (%s)", b.opts.Layout, units.Bytes(plan.DiskSize), units.Bytes(plan.Root.Size), units.Bytes(plan.Root.Start), since(t0))
	return plan, nil
}

// usage is what the root file system needs: the directories outside the
// store, every store path, and a budget for what is written after the
// store. The Nix database needs the NAR hashes, so it is written last:
// budget generously for it, and a little for the files outside the store.
func (b *builder) usage() (ext4.Usage, error) {
	planner := ext4.NewPlanner(b.ext4Options(0))
	for _, d := range b.skeleton() {
		planner.Add(d)
	}
	for i, p := range b.opts.Closure.Paths {
		err := walkHeaders(b.trees[i], p.Path, func(_ *node, _ string, hdr *ext4.Header) error {
			planner.Add(hdr)
			return nil
		})
		if err != nil {
			return ext4.Usage{}, err
		}
	}
	dbBytes := int64(len(b.opts.Closure.Paths))*2048 + 256<<10
	usage := planner.Usage()
	usage.Inodes += 32
	usage.Blocks += blocksFor(dbBytes) + 32
	return usage, nil
}

// sizedPlan lays out a disk for a root file system of at least minFS
// bytes: minFS, a tenth more and the headroom, or, with Options.Size, the
// largest root that fits that disk.
func (b *builder) sizedPlan(minFS int64) (*partition.Plan, error) {
	o := &b.opts
	plan, err := partition.NewPlan(o.Layout, minFS+minFS/10+headroom, o.ESPSize)
	if err != nil || o.Size == 0 {
		return plan, err
	}
	minPlan, err := partition.NewPlan(o.Layout, minFS, o.ESPSize)
	if err != nil {
		return nil, err
	}
	if o.Size < minPlan.DiskSize {
		return nil, &SizeError{Size: o.Size, Min: minPlan.DiskSize}
	}
	plan, err = partition.NewPlan(o.Layout, o.Size-(minPlan.DiskSize-minPlan.Root.Size), o.ESPSize)
	for err == nil && plan.DiskSize > o.Size {
		plan, err = partition.NewPlan(o.Layout, plan.Root.Size-partition.MiB, o.ESPSize)
	}
	return plan, err
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
