package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/nixvm-image/nixvm-image/imagebuild"
	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/partition"
)

// When nixvm-image is the /init of the VM stage's initramfs, it is the guest
// half of the stage and never returns to main. This runs before main and
// before a test binary's TestMain.
func init() {
	if vm.IsGuest() {
		vm.GuestMain()
	}
}

// vmOptions returns the VM stage's options from the build flags.
func (o *buildOptions) vmOptions(toplevel string, epoch int64, log io.Writer) (vm.Options, error) {
	accel, err := vm.ParseAccel(o.accel)
	if err != nil {
		return vm.Options{}, usagef("--accel: %v", err)
	}
	if o.vmTimeout <= 0 {
		return vm.Options{}, usagef("--vm-timeout %s: want a positive duration such as 10m", o.vmTimeout)
	}
	return vm.Options{
		Toplevel: toplevel,
		Kernel:   o.kernel,
		Modules:  o.modules,
		Init:     o.vmInit,
		QEMU:     os.Getenv("NIXVM_IMAGE_QEMU"),
		Accel:    accel,
		Timeout:  o.vmTimeout,
		Epoch:    epoch,
		Log:      log,
	}, nil
}

// vmFlagHint names the VM stage's flags in its errors.
func vmFlagHint(o *buildOptions, err error) error {
	switch {
	case errors.Is(err, vm.ErrNoKernel) && o.kernel != "":
		return fmt.Errorf("--kernel: %w", err)
	case errors.Is(err, vm.ErrNoKernel):
		return fmt.Errorf("%w; pass --kernel (and --modules) to boot the VM stage with another, or --no-bootloader to skip it", err)
	case errors.Is(err, vm.ErrNotNixOS):
		return fmt.Errorf("%w; pass --no-bootloader to build an image without a boot loader", err)
	case errors.Is(err, vm.ErrModules) && o.modules != "":
		return fmt.Errorf("--modules %s: %w", o.modules, err)
	case errors.Is(err, vm.ErrModules):
		return fmt.Errorf("%w; pass --modules with the kernel's modules directory", err)
	case errors.Is(err, vm.ErrTimeout):
		return fmt.Errorf("%w\nthe guest was killed after --vm-timeout %s; raise it if the guest was still working", err, o.vmTimeout)
	}
	return err
}

// bootloaderHook is the imagebuild hook that runs the VM stage.
func (o *buildOptions) bootloaderHook(opts vm.Options, log io.Writer) func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
	return func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
		res, err := vm.Stage(ctx, opts, raw.Name(), plan)
		if err != nil {
			return err
		}
		if log == nil {
			return nil
		}
		fmt.Fprintf(log, "bootloader: installed by switch-to-configuration in a %s VM in %.1fs\n", res.Accel, res.Duration.Seconds())
		if res.KVMProbeFailed {
			fmt.Fprintf(log, "KVM did not start the guest here: --accel tcg skips the probe\n")
		}
		return nil
	}
}

// printDryRun prints the QEMU command lines of the VM stage.
func (o *buildOptions) printDryRun(w io.Writer, vmOpts vm.Options, opts imagebuild.Options) error {
	if o.noBootloader {
		fmt.Fprintln(w, "# --no-bootloader: no VM stage")
		return nil
	}
	plan, err := partition.NewPlan(opts.Layout, 1<<30, opts.ESPSize)
	if err != nil {
		return o.flagHint(err)
	}
	p, err := vm.DryRun(vmOpts, "DISK.raw", "INITRAMFS", plan)
	if err != nil {
		return o.flagHint(err)
	}
	fmt.Fprintf(w, "# VM stage: guest mounts %s", p.Guest.Root)
	if p.Guest.ESP != "" {
		fmt.Fprintf(w, " and %s at /boot", p.Guest.ESP)
	}
	fmt.Fprintf(w, ", then runs in a chroot: %s %s\n", strings.Join(p.Guest.Env[:1], " "), strings.Join(p.Guest.Command, " "))
	for i, c := range p.Configs {
		if i > 0 {
			fmt.Fprintf(w, "# if the guest does not start within the KVM probe time:\n")
		}
		fmt.Fprintln(w, shquote.Join(vm.Cmdline(c)))
	}
	return nil
}
