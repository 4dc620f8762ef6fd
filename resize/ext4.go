package resize

import (
	"errors"
	"fmt"
	"io"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
)

// ext4MaxBlocks32 is the most blocks an ext4 without the 64bit feature can
// have.
const ext4MaxBlocks32 = 1<<32 - 1

// readExt4Super reads the superblock of the file system on r. Bytes that
// hold no ext2/3/4 superblock give ErrNotExt4.
func readExt4Super(r io.ReaderAt) (*ondisk.Superblock, error) {
	sb, err := ondisk.ReadSuperblock(r)
	if errors.Is(err, ondisk.ErrNoSuperblock) {
		return nil, fmt.Errorf("%w: %w", ErrNotExt4, err)
	}
	if err != nil {
		return nil, fmt.Errorf("resize: %w", err)
	}
	return sb, nil
}

// readPartitionSuper opens the partition at path read-only and reads its
// ext4 superblock.
func readPartitionSuper(opts Options, path string) (sb *ondisk.Superblock, err error) {
	part, err := opts.Open(path, false)
	if err != nil {
		return nil, fmt.Errorf("resize: open %s: %w", path, err)
	}
	defer closeDevice(part, path, &err)
	return readExt4Super(part)
}

// closeDevice closes d, and keeps its error in *err unless *err holds one
// already.
func closeDevice(d io.Closer, path string, err *error) {
	if cerr := d.Close(); cerr != nil && *err == nil {
		*err = fmt.Errorf("resize: close %s: %w", path, cerr)
	}
}
