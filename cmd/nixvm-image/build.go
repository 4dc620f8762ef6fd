package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/nixvm-image/nixvm-image/imagebuild"
	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
)

type buildOptions struct {
	toplevel     string
	closure      string
	output       string
	force        bool
	layout       string
	size         string
	espSize      string
	format       string
	compression  string
	level        int
	jobs         int
	quiet        bool
	noBootloader bool
	previous     string

	// NixOS configuration and the VM stage.
	flake     string
	kernel    string
	modules   string
	accel     string
	vmTimeout time.Duration
	vmInit    string
	dryRun    bool
	nix       nixOptions // CONFIG.nix and --flake: flags for Nix (nixflags.go)
}

func (o *buildOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.toplevel, "toplevel", "", "the system, a store `PATH` (/nix/store/…-nixos-system-…) or a link to one (./result); its closure comes from the local Nix unless --closure is given")
	fs.StringVar(&o.closure, "closure", "", "closure description `FILE`: exportReferencesGraph text, nix-store --dump-db or closureInfo registration, or structured-attrs JSON")
	fs.StringVarP(&o.output, "output", "o", "", "`IMAGE` file to write (required); the block manifest goes to IMAGE.manifest")
	fs.BoolVar(&o.force, "force", false, "replace an existing output")
	fs.StringVar(&o.layout, "layout", string(partition.Legacy), "partition layout: legacy (MBR), legacy+gpt (GPT + bios_grub), efi (GPT + ESP), hybrid (GPT + bios_grub + ESP)")
	fs.StringVar(&o.size, "size", "auto", "disk size, e.g. 4G or 4096M; auto = closure + metadata + 10% + 512 MiB")
	fs.StringVar(&o.espSize, "esp-size", "512M", "EFI system partition size for efi and hybrid layouts (at least 512M)")
	fs.StringVar(&o.format, "format", "qcow2", "output format: qcow2 or raw")
	fs.StringVar(&o.compression, "compression", "zstd", "qcow2 cluster compression: zstd, zlib or none")
	fs.IntVar(&o.level, "compression-level", 0, "zstd level 1-22 (default 3, as QEMU; 7 is about 2% smaller and 15% slower)")
	fs.IntVarP(&o.jobs, "jobs", "j", 0, "compression workers (default: all cores); the output is the same for any value")
	fs.BoolVarP(&o.quiet, "quiet", "q", false, "print nothing but errors")
	fs.StringVar(&o.previous, "previous", "auto", "keep the layout of a previous IMAGE (or IMAGE.manifest): store paths in both keep their blocks, so pushes stay small; auto = OUTPUT.manifest when --force replaces an output that has one; none = lay out afresh")
	fs.BoolVar(&o.noBootloader, "no-bootloader", false, "skip the VM stage: install no boot loader (for direct kernel boot)")
	fs.StringVar(&o.flake, "flake", "", "build the NixOS configuration FLAKE#NAME (nixosConfigurations.NAME; FLAKE alone: this host's name) with nix build")
	fs.StringVar(&o.kernel, "kernel", "", "kernel (bzImage) for the VM stage; default: the system's own TOPLEVEL/kernel")
	fs.StringVar(&o.modules, "modules", "", "kernel modules for the VM stage: a directory with modules.dep, or one with lib/modules/RELEASE; default: TOPLEVEL/kernel-modules")
	fs.StringVar(&o.accel, "accel", "auto", "VM stage accelerator: auto (try KVM under a watchdog, fall back to TCG), kvm or tcg")
	fs.DurationVar(&o.vmTimeout, "vm-timeout", vm.DefaultTimeout, "kill the VM stage's guest after this long")
	fs.StringVar(&o.vmInit, "vm-init", "", "static nixvm-image binary used as the VM's /init (default: this executable, which must be static: CGO_ENABLED=0)")
	fs.BoolVar(&o.dryRun, "dry-run", false, "print the VM stage's QEMU command line and write nothing; CONFIG.nix and --flake are only evaluated, nothing is built")
	o.nix.AddFlags(fs)
}

func init() {
	register(&command{
		name:    "build",
		summary: "build a bootable NixOS disk image from a configuration or a system closure",
		usage:   "CONFIG.nix | --flake FLAKE#NAME | --toplevel PATH | --closure FILE  -o IMAGE [flags]",
		help: `Writes a deterministic disk image holding the closure, its Nix database and the
system profile, without root or loop devices. The same closure gives the same bytes
(timestamps come from SOURCE_DATE_EPOCH, default 1).

CONFIG.nix is built with your own Nix as NixOS (nix-build '<nixpkgs/nixos>' on your
NIX_PATH, or -I nixpkgs=PATH), FLAKE#NAME as nixosConfigurations.NAME (nix build; a
local flake in a git repository is a git flake: only tracked files are read). The
build adds its module (root by label, GRUB on /dev/vda or systemd-boot for --layout
efi, virtio modules in the initrd, the first-boot nixvm-resize unit, with the
nixvm-resize beside this executable unless the configuration sets
nixvm.resize.package). -I, --arg, --argstr, --option, --show-trace and --impure go
to Nix; --out-link keeps the built system; --dry-run only evaluates it.

The boot loader is installed by the system itself: a throwaway QEMU VM boots the
system's kernel (or --kernel/--modules) with nixvm-image as its /init, mounts the
image and runs NIXOS_INSTALL_BOOTLOADER=1 switch-to-configuration boot in a chroot.
Its output is shown prefixed "guest: ". --accel auto tries KVM and falls back to
TCG when the guest does not start within 10s; --dry-run prints QEMU's command line;
--no-bootloader skips the VM (images for direct kernel boot). The /init is this
executable, which must be static (CGO_ENABLED=0, as make build makes it), or
--vm-init. Times the guest writes are clamped to SOURCE_DATE_EPOCH afterwards.

The root file system is ext4 labelled "nixos". Beside IMAGE the build writes
IMAGE.manifest, the 4 KiB block hashes that push uses to send only what a host lacks,
and the layout map: where each store path went. A rebuild with --previous OLD (by
default the manifest of the output it replaces) keeps every store path that OLD has
where it was, so pushing the new image sends little more than the changed paths.

Examples:
  nixvm-image build baseline.nix -o baseline.qcow2
  nixvm-image build --flake .#baseline -o baseline.qcow2 --layout efi
  nixvm-image build --toplevel /nix/store/…-nixos-system-baseline -o baseline.qcow2
  nixvm-image build --closure ./closure -o baseline.qcow2 --layout efi
  nixvm-image build --toplevel "$(nix-build '<nixpkgs/nixos>' -A system)" -o vm.raw --format raw --no-bootloader

With --closure, the system is the closure's one root (the path no other path
references); name it with --toplevel when the file describes several roots.`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &buildOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runBuild(ctx, o, c, args) }
		},
	})
}

func runBuild(ctx context.Context, o *buildOptions, c Context, args []string) error {
	config, err := o.source(args)
	if err != nil {
		return err
	}
	opts, err := o.imageOptions()
	if err != nil {
		return err
	}
	log := c.Stderr
	if o.quiet {
		log = nil
	}
	var vmOpts vm.Options
	if !o.noBootloader {
		// Check the VM flags before a long evaluation.
		if vmOpts, err = o.vmOptions("", opts.Epoch, nil); err != nil {
			return err
		}
	}
	toplevelFlag := o.toplevel
	if config != "" || o.flake != "" {
		top, cleanup, err := o.nix.buildSystem(ctx, config, o.flake, opts.Layout, o.dryRun, c.Stdout, log)
		if err != nil {
			return err
		}
		defer cleanup()
		if top == "" {
			return nil // --dry-run of a system that is not built
		}
		toplevelFlag = top
	}
	if opts.Closure, opts.Toplevel, err = loadClosure(ctx, o.closure, toplevelFlag); err != nil {
		return err
	}
	if !o.noBootloader {
		vmOpts.Toplevel = opts.Toplevel
		// Fail early, before the image is written, without a kernel.
		if _, _, err := vmOpts.KernelAndModules(); err != nil {
			return o.flagHint(err)
		}
	}
	if o.dryRun {
		return o.printDryRun(c.Stdout, vmOpts, opts)
	}
	return o.build(ctx, c, opts, vmOpts, log)
}

// source checks the arguments and the flags that name the system, and
// returns CONFIG.nix ("" when none).
func (o *buildOptions) source(args []string) (string, error) {
	if len(args) > 1 {
		return "", usagef("unexpected argument %q: give one CONFIG.nix", args[1])
	}
	config := ""
	if len(args) == 1 {
		config = args[0]
	}
	sources := 0
	for _, s := range []string{config, o.flake, o.toplevel + o.closure} {
		if s != "" {
			sources++
		}
	}
	if sources > 1 {
		return "", usagef("give one of CONFIG.nix, --flake, or --toplevel/--closure")
	}
	if o.output == "" && !o.dryRun {
		return "", usagef("--output (-o) is required: name the image file to write")
	}
	if sources == 0 {
		return "", usagef("give a NixOS configuration (CONFIG.nix or --flake FLAKE#NAME), or a built system (--toplevel PATH or --closure FILE)")
	}
	return config, nil
}

// imageOptions parses the image flags into the builder's options, checked
// by the builder before any evaluation (all but the closure).
func (o *buildOptions) imageOptions() (imagebuild.Options, error) {
	opts := imagebuild.Options{Output: o.output, Force: o.force, Level: o.level, Workers: o.jobs}
	var err error
	if opts.Layout, err = partition.ParseLayout(o.layout); err != nil {
		return opts, usagef("--layout: %v", err)
	}
	if o.size != "auto" {
		if opts.Size, err = units.ParseSize(o.size); err != nil {
			return opts, usagef("--size: %v; or auto", err)
		}
	}
	if opts.ESPSize, err = units.ParseSize(o.espSize); err != nil {
		return opts, usagef("--esp-size: %v", err)
	}
	if opts.Format, err = imagebuild.ParseFormat(o.format); err != nil {
		return opts, usagef("--format: %v", err)
	}
	if opts.Compression, err = qcow.ParseCompression(o.compression); err != nil {
		return opts, usagef("--compression: %v", err)
	}
	if opts.Epoch, err = sourceDateEpoch(); err != nil {
		return opts, err
	}
	if err := opts.Validate(); err != nil {
		return opts, o.flagHint(err)
	}
	if !o.dryRun {
		// Refuse an existing output before any work.
		if err := imagebuild.CheckOutput(o.output, o.force); err != nil {
			return opts, o.flagHint(err)
		}
	}
	opts.Previous = previousImage(o)
	return opts, nil
}

// sourceDateEpoch is SOURCE_DATE_EPOCH, default 1.
func sourceDateEpoch() (int64, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return 1, nil
	}
	epoch, err := strconv.ParseInt(s, 10, 64)
	if err != nil || epoch < 0 {
		return 0, fmt.Errorf("SOURCE_DATE_EPOCH=%q is not a number of seconds; unset it or fix it", s)
	}
	return epoch, nil
}

// build writes the image with progress and prints the summary line.
func (o *buildOptions) build(ctx context.Context, c Context, opts imagebuild.Options, vmOpts vm.Options, log io.Writer) error {
	var pr *progress
	if !o.quiet {
		pr = newProgress(c.Stderr, isTerminal(c.Stderr))
		defer pr.finish()
		opts.Progress = pr
	}
	opts.Log = logWriter(log, pr)
	if !o.noBootloader {
		vmOpts.Log = opts.Log
		opts.Bootloader = o.bootloaderHook(vmOpts, opts.Log)
	}
	res, err := imagebuild.Build(ctx, opts)
	if pr != nil {
		pr.finish()
	}
	if err != nil {
		return o.flagHint(err)
	}
	if !o.quiet {
		secs := res.Duration.Seconds()
		fmt.Fprintf(c.Stdout, "built %s: %d store paths, %s of files, disk %s, output %s, digest %x, in %.1fs (%.0f MB/s)\n",
			res.Output, res.Paths, units.Bytes(res.NarBytes), units.Bytes(res.DiskSize), units.Bytes(res.OutputSize), res.Digest[:8], secs, float64(res.NarBytes)/1e6/max(secs, 1e-3))
	}
	return nil
}

// flagHint turns the libraries' typed errors into messages that name the
// flag to change; bad flag values become usage errors (exit 2).
func (o *buildOptions) flagHint(err error) error {
	var size *imagebuild.SizeError
	switch {
	case errors.As(err, &size):
		return fmt.Errorf("--size %s is too small for this closure (needs at least %s); use --size auto", o.size, units.Bytes(size.Min))
	case errors.Is(err, imagebuild.ErrExist):
		return fmt.Errorf("%w; pass --force to replace it", err)
	case errors.Is(err, imagebuild.ErrPrevious):
		return fmt.Errorf("--previous %s: %w; pass --previous none to lay out afresh", o.previous, err)
	case errors.Is(err, qcow.ErrInvalidOptions):
		return usageError{fmt.Errorf("--compression-level %d with --compression %s: %w", o.level, o.compression, err)}
	case errors.Is(err, partition.ErrESPSize):
		return usageError{fmt.Errorf("--esp-size %s: %w", o.espSize, err)}
	case errors.Is(err, partition.ErrTooLarge):
		return fmt.Errorf("%w; use --layout legacy+gpt", err)
	}
	return vmFlagHint(o, err)
}

// previousImage resolves --previous: auto is the output's manifest when the
// build replaces an output that has one.
func previousImage(o *buildOptions) string {
	switch o.previous {
	case "none", "":
		return ""
	case "auto":
		if o.force {
			if _, err := os.Stat(imagebuild.ManifestPath(o.output)); err == nil {
				return imagebuild.ManifestPath(o.output)
			}
		}
		return ""
	}
	return o.previous
}

// loadClosure reads the closure from a file or from the local Nix, validates
// it, and names its system path.
func loadClosure(ctx context.Context, file, toplevel string) (*nixclosure.Closure, string, error) {
	var c *nixclosure.Closure
	var err error
	if file != "" {
		f, err := os.Open(file)
		if err != nil {
			return nil, "", fmt.Errorf("--closure: %w", err)
		}
		c, err = nixclosure.Parse(f, file)
		f.Close()
		if err != nil {
			return nil, "", err
		}
	} else {
		toplevel = strings.TrimRight(toplevel, "/")
		// A GC root such as ./result names the system through symlinks.
		if !strings.HasPrefix(toplevel, nixclosure.DefaultStoreDir+"/") {
			if r, err := filepath.EvalSymlinks(toplevel); err == nil && strings.HasPrefix(r, nixclosure.DefaultStoreDir+"/") {
				toplevel = r
			}
		}
		c, err = nixclosure.FromToplevel(ctx, toplevel)
		if err != nil {
			return nil, "", fmt.Errorf("--toplevel %s: %w", toplevel, err)
		}
	}
	// Parse and FromToplevel have validated the closure.
	if toplevel != "" {
		if c.Lookup(toplevel) == nil {
			return nil, "", fmt.Errorf("--toplevel %s is not in the closure %s", toplevel, file)
		}
		return c, toplevel, nil
	}
	roots := closureRoots(c)
	if len(roots) != 1 {
		return nil, "", fmt.Errorf("--closure %s has %d roots (%s); name the system with --toplevel", file, len(roots), strings.Join(roots[:min(3, len(roots))], ", "))
	}
	return c, roots[0], nil
}

// closureRoots lists the paths that no other path references.
func closureRoots(c *nixclosure.Closure) []string {
	referenced := map[string]bool{}
	for _, p := range c.Paths {
		for _, r := range p.References {
			if r != p.Path {
				referenced[r] = true
			}
		}
	}
	var roots []string
	for _, p := range c.Paths {
		if !referenced[p.Path] {
			roots = append(roots, p.Path)
		}
	}
	return roots
}
