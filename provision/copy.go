package provision

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/lima-vm/go-qcow2reader/image"
)

// blockSize is the unit in which Copy looks for zeros: the guest file
// system's block size.
const blockSize = 4096

// copyChunk is how much Copy reads at once: whole clusters of any qcow2
// cluster size up to 2 MiB, so go-qcow2reader decodes each cluster once.
const copyChunk = 4 << 20

// Updater receives progress: bytes of the guest disk done so far, in order.
type Updater interface{ Update(done int64) }

// CopyStats says what Copy did.
type CopyStats struct {
	Written int64 // bytes of data written
	Zeroed  int64 // bytes passed to the zero function
}

// Copy writes the first size bytes of the guest disk that img becomes into
// dst: img's non-zero 4 KiB blocks at their offsets. Every other range
// (unallocated or zero extents, zero blocks, and everything from img.Size()
// to size) is passed to zero, in order and coalesced, or skipped when zero
// is nil (a fresh sparse file already reads as zeros). size must be at least
// img.Size().
func Copy(dst io.WriterAt, img image.Image, size int64, zero func(off, n int64) error, u Updater) (CopyStats, error) {
	var st CopyStats
	isize := img.Size()
	if isize < 0 {
		return st, errors.New("provision: image size unknown")
	}
	if size < isize {
		return st, fmt.Errorf("%w: got %d bytes, want at least the image's %d", ErrSize, size, isize)
	}
	var zStart, zLen int64 // pending zero range
	flushZero := func() error {
		if zLen == 0 || zero == nil {
			zLen = 0
			return nil
		}
		err := zero(zStart, zLen)
		st.Zeroed += zLen
		zLen = 0
		return err
	}
	addZero := func(off, n int64) error {
		if zLen > 0 && zStart+zLen == off {
			zLen += n
			return nil
		}
		if err := flushZero(); err != nil {
			return err
		}
		zStart, zLen = off, n
		return nil
	}
	buf := make([]byte, copyChunk)
	for off := int64(0); off < isize; {
		ext, err := img.Extent(off, isize-off)
		if err != nil {
			return st, fmt.Errorf("provision: reading the image's map at %d: %w", off, err)
		}
		if ext.Start != off || ext.Length <= 0 {
			return st, fmt.Errorf("BUG: provision: extent at %d: got start %d length %d", off, ext.Start, ext.Length)
		}
		end := min(off+ext.Length, isize)
		if !ext.Allocated || ext.Zero {
			if err := addZero(off, end-off); err != nil {
				return st, err
			}
			off = end
			if u != nil {
				u.Update(off)
			}
			continue
		}
		for off < end {
			n := min(int64(len(buf)), end-off)
			b := buf[:n]
			if m, err := img.ReadAt(b, off); int64(m) < n {
				if err == nil || err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return st, fmt.Errorf("provision: reading the image at %d: %w", off+int64(m), err)
			}
			// Write runs of non-zero blocks; zero blocks become zero ranges.
			for i := int64(0); i < n; {
				j := i
				for j < n && !allZero(b[j:min(j+blockSize, n)]) {
					j = min(j+blockSize, n)
				}
				if j > i {
					if err := flushZero(); err != nil {
						return st, err
					}
					if _, err := dst.WriteAt(b[i:j], off+i); err != nil {
						return st, fmt.Errorf("provision: writing at %d: %w", off+i, err)
					}
					st.Written += j - i
					i = j
				}
				for j < n && allZero(b[j:min(j+blockSize, n)]) {
					j = min(j+blockSize, n)
				}
				if j > i {
					if err := addZero(off+i, j-i); err != nil {
						return st, err
					}
					i = j
				}
			}
			off += n
			if u != nil {
				u.Update(off)
			}
		}
	}
	if size > isize {
		if err := addZero(isize, size-isize); err != nil {
			return st, err
		}
	}
	if err := flushZero(); err != nil {
		return st, err
	}
	if u != nil {
		u.Update(size)
	}
	return st, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
