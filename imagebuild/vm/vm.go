// Package vm is the image build's VM stage: a throwaway QEMU VM that boots the
// closure's own kernel on the finished raw disk and runs the system's
// `switch-to-configuration boot` in a chroot, so that the boot loader is
// installed by the system's own tools, as on a running NixOS.
//
// Host side: Stage resolves the kernel and its modules, writes a
// deterministic newc initramfs whose /init is a static nixvm-image binary
// (plus only the modules needed to mount the image and a guest
// configuration), boots it with the pure Cmdline, streams the guest's serial
// console to Log prefixed with "guest: ", and reads the guest's exit status
// from a marker line. A guest that does not finish within Timeout is killed.
// With AccelAuto, KVM is tried first under a watchdog: when the guest does
// not report that it started within ProbeTimeout (KVM hangs on some hosts
// though /dev/kvm exists), QEMU is killed and the boot is retried with TCG.
//
// Guest side: GuestMain runs as PID 1 in that initramfs (IsGuest detects it):
// it mounts /proc, /sys and /dev, loads the modules with finit_module, mounts
// the root file system (noatime) and, for layouts with an ESP, the ESP at
// /boot, bind-mounts /dev, /proc and /sys, chroots and runs
// NIXOS_INSTALL_BOOTLOADER=1 /nix/var/nix/profiles/system/bin/switch-to-configuration boot
// with its output on the console, then unmounts, syncs and powers off.
//
// Determinism: the guest writes through the kernel, which stamps inodes with
// the guest clock, gives new inodes random generations (seeding their
// checksums) and journals with its own timing. The guest mounts the root
// file system with noatime and nodelalloc (blocks allocated in write order),
// and after the VM the host clamps inode times to the epoch, resets
// generations and the checksums they seed, and restores the journal and the
// superblock's times (normalize.go): two builds of the same closure give the
// same bytes when the boot loader's own output is deterministic. The ESP is
// FAT, whose times cannot go before 1980: with the default epoch (1) every
// FAT time is 1980-01-01; with a later SOURCE_DATE_EPOCH they follow the guest
// clock (started at the epoch) and may differ by seconds between builds.
package vm

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Accel selects QEMU's accelerator.
type Accel string

// The accelerators. AccelAuto tries KVM under a watchdog and falls back to
// TCG.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// ParseAccel parses auto, kvm or tcg ("" is auto).
func ParseAccel(s string) (Accel, error) {
	switch Accel(s) {
	case "", AccelAuto:
		return AccelAuto, nil
	case AccelKVM, AccelTCG:
		return Accel(s), nil
	}
	return "", fmt.Errorf("%w: got %q, want auto, kvm or tcg", ErrAccel, s)
}

// Errors.
var (
	ErrAccel        = errors.New("vm: unknown accelerator")
	ErrNoKernel     = errors.New("vm: no kernel")
	ErrModules      = errors.New("vm: kernel modules not found")
	ErrNotNixOS     = errors.New("vm: not a NixOS system")
	ErrNotStatic    = errors.New("vm: the VM's /init is not a static binary")
	ErrTimeout      = errors.New("vm: the guest did not finish in time")
	ErrGuestFailed  = errors.New("vm: switch-to-configuration failed in the guest")
	ErrGuestError   = errors.New("vm: the guest could not run switch-to-configuration")
	ErrNoExitStatus = errors.New("vm: the guest stopped without reporting an exit status")
)

// Markers the guest prints on its console, each on a line of its own.
const (
	markerStart = "@@nixvm-vm-start"
	markerExit  = "@@nixvm-vm-exit"  // followed by the exit status
	markerError = "@@nixvm-vm-error" // followed by a message
)

// Config is one boot of the VM. Cmdline turns it into QEMU's argv.
type Config struct {
	QEMU      string // "" means qemu-system-x86_64
	Accel     Accel  // kvm or tcg; auto is resolved before (see Stage)
	Kernel    string
	Initrd    string
	Disk      string // raw disk image, attached as virtio /dev/vda
	MemoryMiB int    // 0 means 512
	Epoch     int64  // the guest's real-time clock starts here (seconds since 1970)
	Append    string // extra kernel parameters
}

// Cmdline returns QEMU's argv (argv[0] included) for cfg. It is pure.
//
// The clock is pinned for reproducibility: -rtc base=EPOCH,clock=vm starts
// the guest's wall clock at Epoch and advances it only while the guest runs.
func Cmdline(cfg Config) []string {
	qemu := cfg.QEMU
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	mem := cfg.MemoryMiB
	if mem == 0 {
		mem = 512
	}
	accel := cfg.Accel
	if accel != AccelKVM {
		accel = AccelTCG
	}
	cpu := "max"
	if accel == AccelKVM {
		cpu = "host"
	}
	appendLine := "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init"
	if cfg.Append != "" {
		appendLine += " " + cfg.Append
	}
	base := time.Unix(cfg.Epoch, 0).UTC().Format("2006-01-02T15:04:05")
	return []string{qemu,
		"-machine", "pc,accel=" + string(accel), "-cpu", cpu, "-smp", "1", "-m", fmt.Sprint(mem),
		"-nodefaults", "-nographic", "-no-reboot", "-no-user-config",
		"-serial", "stdio", "-nic", "none",
		"-rtc", "base=" + base + ",clock=vm",
		"-kernel", cfg.Kernel, "-initrd", cfg.Initrd, "-append", appendLine,
		"-drive", "if=virtio,format=raw,cache=unsafe,file=" + strings.ReplaceAll(cfg.Disk, ",", ",,"),
	}
}
