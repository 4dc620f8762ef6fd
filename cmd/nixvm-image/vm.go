package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
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

// bootloaderHook is the imagebuild hook that runs the VM stage.
func bootloaderHook(opts vm.Options, log io.Writer) func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
	return func(ctx context.Context, raw *os.File, plan *partition.Plan) error {
		res, err := vm.Stage(ctx, opts, raw.Name(), plan)
		if err != nil {
			return err
		}
		if log != nil {
			fmt.Fprintf(log, "bootloader: installed by switch-to-configuration in a %s VM in %.1fs\n", res.Accel, res.Duration.Seconds())
		}
		return nil
	}
}

// printDryRun prints the QEMU command lines of the VM stage.
func printDryRun(w io.Writer, opts vm.Options, output string, plan *partition.Plan) error {
	p, err := vm.DryRun(opts, "DISK.raw", "INITRAMFS", plan)
	if err != nil {
		return err
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
		fmt.Fprintln(w, vm.ShellQuote(vm.Cmdline(c)))
	}
	return nil
}
