package qcow

import (
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// SparseReader is a source that can report its holes: Seek must understand
// whence values SEEK_DATA and SEEK_HOLE (lseek(2)), as *os.File does on
// Linux.
type SparseReader interface {
	io.ReaderAt
	io.Seeker
}

// copyChunk is how much CopySparse reads per call.
const copyChunk = 4 << 20

// CopySparse copies the first size bytes of src (a raw disk image) into w,
// reading only the data regions that lseek(SEEK_DATA/SEEK_HOLE) reports: holes
// are skipped and become unallocated clusters. When src cannot report holes
// (the seek fails with EINVAL or ENOTSUP) it is read whole; zero clusters
// still stay unallocated. Reads start at offset 0 and must not overlap
// earlier writes to w. It returns the number of bytes read from src. The
// position of src's seek offset is left unspecified.
func CopySparse(w *Writer, src SparseReader, size int64) (int64, error) {
	buf := make([]byte, min(copyChunk, max(size, 1)))
	var read int64
	copyRange := func(start, end int64) error {
		for off := start; off < end; {
			n := int(min(int64(len(buf)), end-off))
			m, err := src.ReadAt(buf[:n], off)
			if m < n {
				if err == nil || errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("qcow: reading source at %d: %w", off+int64(m), err)
			}
			read += int64(n)
			if _, err := w.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += int64(n)
		}
		return nil
	}
	for off := int64(0); off < size; {
		data, err := src.Seek(off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				return read, nil // no data after off: the rest is a hole
			}
			if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.ESPIPE) {
				return read, copyRange(off, size)
			}
			return read, fmt.Errorf("qcow: SEEK_DATA at %d: %w", off, err)
		}
		if data >= size {
			return read, nil
		}
		hole, err := src.Seek(data, unix.SEEK_HOLE)
		if err != nil {
			return read, fmt.Errorf("qcow: SEEK_HOLE at %d: %w", data, err)
		}
		hole = min(hole, size)
		if err := copyRange(data, hole); err != nil {
			return read, err
		}
		off = hole
	}
	return read, nil
}
