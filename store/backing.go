package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

var (
	// ErrNotQcow2 reports a file without the qcow2 magic.
	ErrNotQcow2 = errors.New("store: not a qcow2 image")
	// ErrBadHeader reports a qcow2 header whose backing file name is out of bounds.
	ErrBadHeader = errors.New("store: bad qcow2 header")
)

// maxBackingName is QEMU's limit on a backing file name (docs/interop/qcow2.txt:
// "Must not be longer than 1023 bytes").
const maxBackingName = 1023

// BackingFile returns the backing file name recorded in a qcow2 header ("" if
// none), as written: it may be relative to the image's directory. The header
// layout (big-endian): magic "QFI\xfb" at 0, version at 4, backing file
// offset (8 bytes) at 8, its length (4 bytes) at 16.
func BackingFile(r io.ReaderAt) (string, error) {
	var h [20]byte
	if _, err := r.ReadAt(h[:], 0); err != nil {
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			return "", ErrNotQcow2
		}
		return "", err
	}
	if string(h[:4]) != "QFI\xfb" {
		return "", ErrNotQcow2
	}
	if v := binary.BigEndian.Uint32(h[4:]); v != 2 && v != 3 {
		return "", fmt.Errorf("%w: version: got %d, want 2 or 3", ErrBadHeader, v)
	}
	off := binary.BigEndian.Uint64(h[8:])
	n := binary.BigEndian.Uint32(h[16:])
	if off == 0 {
		return "", nil
	}
	if n == 0 || n > maxBackingName || off > 1<<31 {
		return "", fmt.Errorf("%w: backing file name at %d, %d bytes", ErrBadHeader, off, n)
	}
	name := make([]byte, n)
	if _, err := r.ReadAt(name, int64(off)); err != nil {
		return "", fmt.Errorf("%w: backing file name at %d, %d bytes: %v", ErrBadHeader, off, n, err)
	}
	return string(name), nil
}
