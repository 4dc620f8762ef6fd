// Command growfs grows the mounted ext4 filesystem at a path to a number of
// 4 KiB blocks with EXT4_IOC_RESIZE_FS, for TestOnlineGrowth's guest.
package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
	"unsafe"
)

const ext4IocResizeFS = 0x40086610

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: growfs MOUNTPOINT BLOCKS")
		os.Exit(2)
	}
	n, err := strconv.ParseUint(os.Args[2], 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), ext4IocResizeFS, uintptr(unsafe.Pointer(&n))); e != 0 {
		fmt.Fprintln(os.Stderr, "EXT4_IOC_RESIZE_FS:", e)
		os.Exit(1)
	}
}
