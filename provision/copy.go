package provision

import (
	"errors"
	"fmt"
	"io"

	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/nixvm-image/nixvm-image/internal/zeros"
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
	isize := img.Size()
	if isize < 0 {
		return CopyStats{}, errors.New("provision: image size unknown")
	}
	if size < isize {
		return CopyStats{}, fmt.Errorf("%w: got %d bytes, want at least the image's %d", ErrSize, size, isize)
	}
	c := &copier{dst: dst, zero: zero, u: u, buf: make([]byte, copyChunk)}
	for off := int64(0); off < isize; {
		ext, err := img.Extent(off, isize-off)
		if err != nil {
			return c.st, fmt.Errorf("provision: reading the image's map at %d: %w", off, err)
		}
		if ext.Start != off || ext.Length <= 0 {
			return c.st, fmt.Errorf("BUG: provision: extent at %d: got start %d length %d", off, ext.Start, ext.Length)
		}
		end := min(off+ext.Length, isize)
		if !ext.Allocated || ext.Zero {
			err = c.addZero(off, end-off)
			c.progress(end)
		} else {
			err = c.copyRange(img, off, end)
		}
		if err != nil {
			return c.st, err
		}
		off = end
	}
	if size > isize {
		if err := c.addZero(isize, size-isize); err != nil {
			return c.st, err
		}
	}
	if err := c.flushZero(); err != nil {
		return c.st, err
	}
	c.progress(size)
	return c.st, nil
}

// copier is one Copy: the zero range pending and what was done.
type copier struct {
	dst          io.WriterAt
	zero         func(off, n int64) error
	u            Updater
	buf          []byte
	st           CopyStats
	zStart, zLen int64 // pending zero range
}

func (c *copier) progress(done int64) {
	if c.u != nil {
		c.u.Update(done)
	}
}

// flushZero passes the pending zero range on.
func (c *copier) flushZero() error {
	if c.zLen == 0 || c.zero == nil {
		c.zLen = 0
		return nil
	}
	err := c.zero(c.zStart, c.zLen)
	c.st.Zeroed += c.zLen
	c.zLen = 0
	return err
}

// addZero extends the pending zero range by [off, off+n), or starts a new one.
func (c *copier) addZero(off, n int64) error {
	if c.zLen > 0 && c.zStart+c.zLen == off {
		c.zLen += n
		return nil
	}
	if err := c.flushZero(); err != nil {
		return err
	}
	c.zStart, c.zLen = off, n
	return nil
}

// copyRange copies the allocated range [off, end) of img in chunks.
func (c *copier) copyRange(img image.Image, off, end int64) error {
	for off < end {
		n := min(int64(len(c.buf)), end-off)
		b := c.buf[:n]
		if m, err := img.ReadAt(b, off); int64(m) < n {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("provision: reading the image at %d: %w", off+int64(m), err)
		}
		if err := c.write(b, off); err != nil {
			return err
		}
		off += n
		c.progress(off)
	}
	return nil
}

// write writes the runs of non-zero blocks of b (at off); its zero blocks
// become zero ranges.
func (c *copier) write(b []byte, off int64) error {
	n := int64(len(b))
	isZero := func(j int64) bool { return zeros.All(b[j:min(j+blockSize, n)]) }
	for i := int64(0); i < n; {
		j := i
		for j < n && !isZero(j) {
			j = min(j+blockSize, n)
		}
		if j > i {
			if err := c.flushZero(); err != nil {
				return err
			}
			if _, err := c.dst.WriteAt(b[i:j], off+i); err != nil {
				return fmt.Errorf("provision: writing at %d: %w", off+i, err)
			}
			c.st.Written += j - i
			i = j
		}
		for j < n && isZero(j) {
			j = min(j+blockSize, n)
		}
		if j > i {
			if err := c.addZero(off+i, j-i); err != nil {
				return err
			}
			i = j
		}
	}
	return nil
}
