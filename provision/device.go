package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BLKZEROOUT is _IO(0x12, 127): zero a byte range of a block device. The
// kernel turns it into REQ_OP_WRITE_ZEROES, which thin LVs, SSDs and loop
// devices serve by unmapping where they can guarantee zeros, and falls back
// to writing zero pages. We do not use BLKDISCARD: BLKDISCARDZEROES always
// reports 0 since Linux 4.12, so a discard never promises that the range
// reads back as zeros.
const blkZeroOut = 0x127f

// zeroChunk bounds one BLKZEROOUT call so cancellation and progress stay
// responsive on large devices.
const zeroChunk = 1 << 30

// zeroDevice zeroes [off, off+n) of the block device f.
func zeroDevice(f *os.File, off, n int64) error {
	for n > 0 {
		c := min(n, zeroChunk)
		r := [2]uint64{uint64(off), uint64(c)}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), blkZeroOut, uintptr(unsafe.Pointer(&r)))
		if errno != 0 {
			if errno == unix.EOPNOTSUPP || errno == unix.ENOTTY || errno == unix.EINVAL {
				return writeZeros(f, off, n)
			}
			return fmt.Errorf("provision: BLKZEROOUT %s at %d, %d bytes: %w", f.Name(), off, c, errno)
		}
		off += c
		n -= c
	}
	return nil
}

func writeZeros(f *os.File, off, n int64) error {
	buf := make([]byte, min(n, 4<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := f.WriteAt(buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// isBlockDevice reports whether path is (or links to) a block device.
func isBlockDevice(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
}

// nodeWait is how long provision waits for udev to make a new LV's node.
var nodeWait = 10 * time.Second

// waitBlockDevice waits until path is a block device, for nodeWait.
func waitBlockDevice(ctx context.Context, path string) bool {
	deadline := time.Now().Add(nodeWait)
	for !isBlockDevice(path) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// deviceSize returns a block device's size in bytes.
func deviceSize(f *os.File) (int64, error) {
	n, err := f.Seek(0, 2)
	if err != nil {
		return 0, fmt.Errorf("provision: size of %s: %w", f.Name(), err)
	}
	return n, nil
}

// lockHolder reports whether another open file description holds a POSIX or
// OFD lock on path: QEMU locks every image it has open (bytes 100 and up of
// the file, since QEMU 2.10), so this finds a disk in use even by a QEMU that
// libvirt does not manage. A path that cannot be opened is not in use.
func lockHolder(path string) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("provision: F_OFD_GETLK %s: %w", path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}
