package store

import (
	"errors"
	"fmt"
	"github.com/nixvm-image/nixvm-image/qcow"
	"os"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"
)

// Reader reads the virtual disk of a stored generation.
type Reader struct {
	f   *os.File
	img image.Image
}

// Open opens generation g for reading.
func (g Generation) Open() (*Reader, error) {
	f, err := os.Open(g.Path)
	if err != nil {
		return nil, err
	}
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("store: opening %s: %w", g.Path, err), f.Close())
	}
	return &Reader{f, img}, nil
}

// Size is the virtual disk's size in bytes.
func (r *Reader) Size() int64 { return r.img.Size() }

// ReadAt reads the virtual disk.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) { return r.img.ReadAt(p, off) }

// ReadBlocks reads whole blocks from start; past the disk's end reads as zeros.
func (r *Reader) ReadBlocks(start int64, buf []byte) error {
	return readBlocksAt(r.img, r.img.Size(), start, buf)
}

// Close closes the image and its file.
func (r *Reader) Close() error {
	return errors.Join(r.img.Close(), r.f.Close())
}
