package imagebuild

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/lima-vm/go-qcow2reader"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// layoutFromImage reads a layout map from an image (qcow2 or raw) that has
// no manifest: its root file system is where Options.Layout puts it on a disk of
// the image's size, and ext4.ReadPlacements recovers the units from the
// file system itself. The identifiers outside the file system (partition
// IDs) cannot be recovered: they derive from this build's toplevel.
func (b *builder) layoutFromImage(f *os.File) (*manifest.Layout, error) {
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	if err := img.Readable(); err != nil {
		return nil, err
	}
	size := img.Size()
	p0, err := partition.NewPlan(b.opts.Layout, 1<<30, b.opts.ESPSize)
	if err != nil {
		return nil, err
	}
	plan, err := partition.NewPlan(b.opts.Layout, size-(p0.DiskSize-p0.Root.Size), b.opts.ESPSize)
	if err != nil || plan.DiskSize != size {
		return nil, fmt.Errorf("a %d-byte disk is not one that layout %s makes", size, b.opts.Layout)
	}
	opts, ps, err := ext4.ReadPlacements(io.NewSectionReader(img, plan.Root.Start, plan.Root.Size), storeUnit)
	if err != nil {
		return nil, err
	}
	l := b.layoutMap(plan, opts, ps)
	l.Lineage = ""
	return l, nil
}

// storeUnit is the placement unit of the entry at name, as writeRoot
// begins them: a store path's base name for everything in it, "" for the
// directories above the store, unitOf(name) for the rest.
func storeUnit(name string) string {
	switch {
	case name == "." || name == "nix" || name == "nix/store":
		return ""
	case strings.HasPrefix(name, "nix/store/"):
		return strings.SplitN(name, "/", 4)[2]
	}
	return unitOf(name)
}
