package resize

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ext4IocResizeFS is EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64) in
// fs/ext4/ext4.h; x/sys/unix does not define it.
const ext4IocResizeFS = 0x40086610

func statDev(path string) (uint32, uint32, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, 0, err
	}
	return unix.Major(st.Dev), unix.Minor(st.Dev), nil
}

// blkpgResize asks the kernel to resize partition pno of the disk (start and
// length in bytes). Unlike BLKRRPART it works while the partition is in use.
func blkpgResize(diskPath string, pno int, start, length int64) (err error) {
	f, err := os.Open(diskPath)
	if err != nil {
		return err
	}
	defer closeDevice(f, diskPath, &err)
	part := unix.BlkpgPartition{Start: start, Length: length, Pno: int32(pno)}
	arg := unix.BlkpgIoctlArg{
		Op:      unix.BLKPG_RESIZE_PARTITION,
		Datalen: int32(unsafe.Sizeof(part)),
		Data:    (*byte)(unsafe.Pointer(&part)),
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKPG, uintptr(unsafe.Pointer(&arg)))
	if errno != 0 {
		return errno
	}
	return nil
}

// ext4Resize grows the ext4 mounted at mountpoint to blocks blocks.
func ext4Resize(mountpoint string, blocks uint64) (err error) {
	f, err := os.Open(mountpoint)
	if err != nil {
		return err
	}
	defer closeDevice(f, mountpoint, &err)
	n := blocks
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ext4IocResizeFS, uintptr(unsafe.Pointer(&n)))
	if errno == unix.EPERM {
		return fmt.Errorf("%w (needs CAP_SYS_RESOURCE)", errno)
	}
	if errno != 0 {
		return errno
	}
	return nil
}

func lockExclusive(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_EX)
}
