package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// IsGuest reports whether this process is the VM stage's /init: PID 1 with
// the guest configuration beside it.
func IsGuest() bool {
	if os.Getpid() != 1 {
		return false
	}
	_, err := os.Stat("/" + guestConfigPath)
	return err == nil
}

// GuestMain is the VM stage's /init. It never returns: it powers the VM off
// after printing the exit status of switch-to-configuration, or an error, as
// a marker line on the console.
func GuestMain() {
	fmt.Println(markerStart)
	code, err := guest()
	if err != nil {
		fmt.Printf("%s %v\n", markerError, err)
	} else {
		fmt.Printf("%s %d\n", markerExit, code)
	}
	unix.Sync()
	for {
		unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		time.Sleep(time.Second)
	}
}

const target = "/mnt"

// guest mounts the image, runs the command in a chroot and returns its exit
// status; the image is unmounted again whatever happened.
func guest() (code int, err error) {
	cfg, err := readGuestConfig()
	if err != nil {
		return 0, err
	}
	if err := mountKernelFS(); err != nil {
		return 0, err
	}
	for _, m := range cfg.Modules {
		if err := loadModule("/lib/modules/" + m); err != nil {
			return 0, err
		}
	}
	if err := waitFor(cfg.Root, 20*time.Second); err != nil {
		return 0, err
	}
	// noatime: reading the store must not write access times into the
	// image.
	// nodelalloc: blocks are allocated at write(2), in the order of the
	// writes, not at writeback, whose timing varies.
	if err := unix.Mount(cfg.Root, target, "ext4", unix.MS_NOATIME, "nodelalloc"); err != nil {
		return 0, fmt.Errorf("mount the root file system %s: %w", cfg.Root, err)
	}
	var mounted []string
	defer func() {
		if uerr := unmountAll(append([]string{target}, mounted...)); err == nil {
			err = uerr
		}
	}()
	if err := mountInImage(cfg, &mounted); err != nil {
		return 0, err
	}
	return runInChroot(cfg)
}

func readGuestConfig() (*GuestConfig, error) {
	b, err := os.ReadFile("/" + guestConfigPath)
	if err != nil {
		return nil, err
	}
	var cfg GuestConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", guestConfigPath, err)
	}
	if len(cfg.Command) == 0 {
		return nil, errors.New("BUG: no command")
	}
	return &cfg, nil
}

// mountKernelFS mounts /proc, /sys and /dev in the initramfs.
func mountKernelFS() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := unix.Mount(m.src, m.dst, m.fs, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fs, m.dst, err)
		}
	}
	return nil
}

// mountInImage mounts, below the image's root, the ESP on /boot (when the
// layout has one), then what nixos-enter mounts: the guest's /dev, /proc
// and /sys bound, and empty tmpfs on /run (switch-to-configuration's lock)
// and /tmp. Each mount point is added to mounted as it is mounted.
func mountInImage(cfg *GuestConfig, mounted *[]string) error {
	if cfg.ESP != "" {
		if err := waitFor(cfg.ESP, 5*time.Second); err != nil {
			return err
		}
		dir := target + "/boot"
		if err := mkdirIfMissing(dir, 0o755); err != nil {
			return err
		}
		// The kernel's defaults, with the time zone pinned: FAT stores
		// local time.
		if err := unix.Mount(cfg.ESP, dir, "vfat", unix.MS_NOATIME, "tz=UTC"); err != nil {
			return fmt.Errorf("mount the ESP %s on /boot: %w", cfg.ESP, err)
		}
		*mounted = append(*mounted, dir)
	}
	for _, m := range []struct {
		src, dir, fs string
		flags        uintptr
		mode         uint32
	}{
		{"/dev", "/dev", "", unix.MS_BIND | unix.MS_REC, 0o755},
		{"/proc", "/proc", "", unix.MS_BIND | unix.MS_REC, 0o555},
		{"/sys", "/sys", "", unix.MS_BIND | unix.MS_REC, 0o555},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, 0o755},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, 0o1777},
	} {
		dst := target + m.dir
		if err := mkdirIfMissing(dst, m.mode); err != nil {
			return err
		}
		data := ""
		if m.fs == "tmpfs" {
			data = fmt.Sprintf("mode=%o", m.mode)
		}
		if err := unix.Mount(m.src, dst, m.fs, m.flags, data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.src, m.dir, err)
		}
		*mounted = append(*mounted, dst)
	}
	return nil
}

// runInChroot runs cfg.Command in the image with its output on the
// console and returns its exit status (128+N for a signal).
func runInChroot(cfg *GuestConfig) (int, error) {
	cmd := exec.Command(cfg.Command[0], cfg.Command[1:]...)
	cmd.Path = cfg.Command[0] // resolved in the chroot, not here
	cmd.Env = cfg.Env
	cmd.Dir = "/"
	cmd.Stdin = nil
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stdout // one stream keeps the order on the console
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: target}
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
		if code < 0 {
			code = 128 + int(ee.Sys().(syscall.WaitStatus).Signal())
		}
	default:
		return 0, fmt.Errorf("run %s in the image: %w", cfg.Command[0], err)
	}
	unix.Sync()
	return code, nil
}

// unmountAll unmounts dirs in reverse order and returns the first error.
func unmountAll(dirs []string) error {
	var err error
	for i := len(dirs) - 1; i >= 0; i-- {
		if uerr := unmount(dirs[i]); uerr != nil && err == nil {
			err = uerr
		}
	}
	return err
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w (do the kernel and its modules match?)", filepath.Base(path), err)
	}
	return nil
}

func waitFor(dev string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(dev); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", dev, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// mkdirIfMissing makes a mount point in the image with mode (the umask
// does not apply: the mode is what a NixOS system has).
func mkdirIfMissing(dir string, mode uint32) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil
		}
		return err
	}
	return unix.Chmod(dir, mode)
}

func unmount(dir string) error {
	var err error
	for range 50 {
		if err = unix.Unmount(dir, 0); err == nil || errors.Is(err, unix.EINVAL) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("unmount %s: %w", dir, err)
}
