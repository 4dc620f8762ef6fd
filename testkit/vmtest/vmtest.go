// Package vmtest is the test-side wrapper of internal/busyboxvm: it boots a
// Linux kernel with a small busybox initramfs in QEMU (TCG, no KVM needed)
// for tests that need a real kernel (online ext4 growth, BLKPG, device
// naming, the image builder's VM stage), and adds what only tests need:
// Kernel skips the test (fails it in CI) when the host has no kernel.
//
// Environment: NIXVM_VMTEST_KERNEL and NIXVM_VMTEST_QEMU override the kernel
// and the QEMU binary.
package vmtest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/nixvm-image/nixvm-image/internal/busyboxvm"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// The boot's pieces, from internal/busyboxvm.
type (
	Disk            = busyboxvm.Disk
	Config          = busyboxvm.Config
	Module          = busyboxvm.Module
	File            = busyboxvm.File
	InitramfsConfig = busyboxvm.InitramfsConfig
)

// ErrNoDone is returned by Run when the guest did not reach the end of its
// script (crash, panic, timeout).
var ErrNoDone = busyboxvm.ErrNoDone

var (
	// Cmdline returns QEMU's argv for a Config; it is pure.
	Cmdline = busyboxvm.Cmdline
	// Modules resolves kernel modules with their dependencies, in load
	// order, decompressed.
	Modules = busyboxvm.Modules
	// BuildInitramfs writes a deterministic busybox initramfs.
	BuildInitramfs = busyboxvm.BuildInitramfs
	// Run boots a Config and returns the serial output.
	Run = busyboxvm.Run
	// Markers returns the values of the guest's "@@KEY VALUE" lines.
	Markers = busyboxvm.Markers
	// ShellQuote renders argv as a command line a shell runs unchanged.
	ShellQuote = shquote.Join
)

// Kernel finds the kernel to boot and its release (busyboxvm.FindKernel).
// It skips the test (fails in CI) when there is none.
func Kernel(t testing.TB) (path, release string) {
	t.Helper()
	path, release, err := busyboxvm.FindKernel("")
	if err != nil {
		testutil.Skip(t, "%v", err)
	}
	return path, release
}

// Initramfs writes the initramfs cfg describes to a new file in the test's
// temporary directory and returns its path.
func Initramfs(t testing.TB, cfg InitramfsConfig) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "initrd.cpio")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	err = BuildInitramfs(f, cfg)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("initramfs: %v", err)
	}
	return path
}
