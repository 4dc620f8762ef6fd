package imagebuild

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
)

// publish is the last phase: the manifest is written beside the image,
// both are synced and closed, then renamed into place, image first, and
// the directory synced. An old manifest is removed before the new image
// appears, so no image ever sits beside another image's manifest.
func (b *builder) publish(img *packed) error {
	out := b.opts.Output
	mf, err := b.tempFile(".manifest.tmp")
	if err != nil {
		return err
	}
	if _, err := img.manifest.WriteTo(mf); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	for _, f := range []*os.File{mf, img.file} {
		if err := f.Chmod(0o644); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	if err := os.Remove(ManifestPath(out)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove the old manifest: %w", err)
	}
	if err := os.Rename(img.file.Name(), out); err != nil {
		return fmt.Errorf("publish %s: %w", out, err)
	}
	if err := os.Rename(mf.Name(), ManifestPath(out)); err != nil {
		return fmt.Errorf("publish %s: %w", ManifestPath(out), err)
	}
	if err := fsutil.SyncDir(filepath.Dir(out)); err != nil {
		return fmt.Errorf("sync the directory of %s: %w", out, err)
	}
	return nil
}
