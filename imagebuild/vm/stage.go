package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/partition"
)

// Options configure the VM stage. The zero value of each optional field is
// the default.
type Options struct {
	// Toplevel is the system; its kernel and kernel-modules are used unless
	// Kernel and Modules are given.
	Toplevel string
	Kernel   string // bzImage; default Toplevel/kernel
	Modules  string // a directory with modules.dep, or one holding lib/modules/<release>/; default Toplevel/kernel-modules
	Init     string // static nixvm-image binary for /init; default the running executable

	QEMU         string        // default qemu-system-x86_64
	Accel        Accel         // default auto
	Timeout      time.Duration // default 10 minutes
	ProbeTimeout time.Duration // KVM watchdog for auto; default 10 s
	MemoryMiB    int           // default 512
	Epoch        int64         // the guest clock's start; default 1

	Log io.Writer // guest output (prefixed "guest: ") and notes; nil discards
}

// DefaultTimeout is how long the guest may run by default.
const DefaultTimeout = 10 * time.Minute

// Command is what the guest runs in the chroot.
var Command = []string{"/nix/var/nix/profiles/system/bin/switch-to-configuration", "boot"}

// Env is the environment of Command.
var Env = []string{
	"NIXOS_INSTALL_BOOTLOADER=1",
	"PATH=/nix/var/nix/profiles/system/sw/bin:/nix/var/nix/profiles/system/sw/sbin",
	"HOME=/",
	"LANG=C.UTF-8",
	"LOCALE_ARCHIVE=/nix/var/nix/profiles/system/sw/lib/locale/locale-archive",
}

// moduleNames are the modules the guest needs to mount the image; the ones
// in optionalModules are skipped when the kernel has neither them nor has
// them built in (codepages some kernels lack).
var (
	moduleNames     = []string{"virtio_pci", "virtio_blk", "ext4", "crc32c_generic"}
	espModuleNames  = []string{"vfat", "nls_cp437", "nls_iso8859_1", "nls_ascii", "nls_utf8"}
	optionalModules = map[string]bool{"crc32c_generic": true, "nls_iso8859_1": true, "nls_ascii": true, "nls_utf8": true}
)

func (o *Options) defaults() error {
	if o.Accel == "" {
		o.Accel = AccelAuto
	}
	if _, err := ParseAccel(string(o.Accel)); err != nil {
		return err
	}
	if o.Timeout == 0 {
		o.Timeout = DefaultTimeout
	}
	if o.ProbeTimeout == 0 {
		o.ProbeTimeout = 10 * time.Second
	}
	if o.Epoch == 0 {
		o.Epoch = 1
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	return nil
}

// KernelAndModules returns the kernel and the modules directory (the one
// holding modules.dep) that the stage boots. It also checks that the system
// has a switch-to-configuration to run.
func (o *Options) KernelAndModules() (kernel, modules string, err error) {
	kernel = o.Kernel
	if kernel == "" {
		kernel = filepath.Join(o.Toplevel, "kernel")
		if _, err := os.Stat(kernel); err != nil {
			return "", "", fmt.Errorf("%w: the system %s has no kernel: %w", ErrNoKernel, o.Toplevel, err)
		}
	} else if _, err := os.Stat(kernel); err != nil {
		return "", "", fmt.Errorf("%w: %w", ErrNoKernel, err)
	}
	if o.Toplevel != "" {
		stc := filepath.Join(o.Toplevel, Command[0][len("/nix/var/nix/profiles/system"):])
		if _, err := os.Stat(stc); err != nil {
			return "", "", fmt.Errorf("%w: the system %s has no %s", ErrNotNixOS, o.Toplevel, stc[len(o.Toplevel)+1:])
		}
	}
	modules = o.Modules
	if modules == "" {
		modules = filepath.Join(o.Toplevel, "kernel-modules")
	}
	if modules, err = modulesDir(modules); err != nil {
		return "", "", err
	}
	return kernel, modules, nil
}

// modulesDir finds the directory with modules.dep: dir itself, or
// dir/lib/modules/<release> when there is exactly one release.
func modulesDir(dir string) (string, error) {
	if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err == nil {
		return dir, nil
	}
	rels, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*", "modules.dep"))
	sort.Strings(rels)
	switch len(rels) {
	case 1:
		return filepath.Dir(rels[0]), nil
	case 0:
		return "", fmt.Errorf("%w: neither %s/modules.dep nor %s/lib/modules/*/modules.dep exists", ErrModules, dir, dir)
	}
	return "", fmt.Errorf("%w: %s holds modules for several kernels (%s): name one of them", ErrModules, dir, strings.Join(rels, ", "))
}

// devices returns the guest's root and ESP device nodes for plan.
func devices(plan *partition.Plan) (root, esp string) {
	for _, p := range plan.Partitions() {
		switch p.Name {
		case "ESP":
			esp = fmt.Sprintf("/dev/vda%d", p.Index)
		case "nixos":
			root = fmt.Sprintf("/dev/vda%d", p.Index)
		}
	}
	return root, esp
}

// Plan is what Stage will run, for --dry-run.
type Plan struct {
	Configs []Config // the boots in order: with auto, KVM then TCG
	Guest   GuestConfig
}

// DryRun returns the QEMU command lines the stage would run on disk, with
// initrd standing for the generated initramfs.
func DryRun(opts Options, disk, initrd string, plan *partition.Plan) (*Plan, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	kernel, _, err := opts.KernelAndModules()
	if err != nil {
		return nil, err
	}
	root, esp := devices(plan)
	cfg := Config{QEMU: opts.QEMU, Kernel: kernel, Initrd: initrd, Disk: disk, MemoryMiB: opts.MemoryMiB, Epoch: opts.Epoch}
	p := &Plan{Guest: GuestConfig{Root: root, ESP: esp, Command: Command, Env: Env}}
	for _, a := range accels(opts.Accel) {
		c := cfg
		c.Accel = a
		p.Configs = append(p.Configs, c)
	}
	return p, nil
}

func accels(a Accel) []Accel {
	switch a {
	case AccelKVM:
		return []Accel{AccelKVM}
	case AccelTCG:
		return []Accel{AccelTCG}
	}
	if kvmUsable() {
		return []Accel{AccelKVM, AccelTCG}
	}
	return []Accel{AccelTCG}
}

// Result describes a finished VM stage.
type Result struct {
	Accel    Accel         // the accelerator that ran the guest
	Duration time.Duration // wall time, initramfs included
	Boot     time.Duration // wall time of the successful boot
	// KVMProbeFailed says that with AccelAuto, KVM did not start the guest
	// within ProbeTimeout and the stage fell back to TCG.
	KVMProbeFailed bool
}

// Stage installs the boot loader into the raw disk at disk, laid out as plan:
// it boots the VM and runs switch-to-configuration boot in the image, then
// normalises what the guest's kernel wrote (normalize.go).
func Stage(ctx context.Context, opts Options, disk string, plan *partition.Plan) (res *Result, err error) {
	start := time.Now()
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	kernel, modDir, err := opts.KernelAndModules()
	if err != nil {
		return nil, err
	}
	root, esp := devices(plan)
	guest := GuestConfig{Root: root, ESP: esp, Command: Command, Env: Env}
	initrd, nmods, err := stageInitramfs(opts, modDir, filepath.Dir(disk), guest)
	if err != nil {
		return nil, err
	}
	defer func() {
		if rerr := os.Remove(initrd); rerr != nil && err == nil {
			res, err = nil, fmt.Errorf("vm: remove the initramfs: %w", rerr)
		}
	}()

	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	defer f.Close() // on errors; closed and checked below
	snap, err := snapshotExt4(f, plan.Root.Start)
	if err != nil {
		return nil, err
	}
	cfg := Config{QEMU: opts.QEMU, Kernel: kernel, Initrd: initrd, Disk: disk, MemoryMiB: opts.MemoryMiB, Epoch: opts.Epoch}
	if res, err = bootStage(ctx, opts, cfg, nmods); err != nil {
		return nil, err
	}
	st, err := snap.restore(f, opts.Epoch)
	if err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	fmt.Fprintf(opts.Log, "vm: normalised the root file system: %d inode timestamps clamped to %d, journal and superblock times restored\n", st.Inodes, opts.Epoch)
	res.Duration = time.Since(start)
	return res, nil
}

// stageInitramfs writes the stage's initramfs into a temporary file in dir:
// the static /init, the modules that mounting the image needs, and guest.
// It returns the file's name and the number of modules.
func stageInitramfs(opts Options, modDir, dir string, guest GuestConfig) (string, int, error) {
	init := opts.Init
	if init == "" {
		var err error
		if init, err = os.Executable(); err != nil {
			return "", 0, fmt.Errorf("vm: find the running executable for the VM's /init: %w", err)
		}
	}
	if err := CheckStatic(init); err != nil {
		return "", 0, err
	}
	initData, err := os.ReadFile(init)
	if err != nil {
		return "", 0, fmt.Errorf("vm: %w", err)
	}
	names := moduleNames
	if guest.ESP != "" {
		names = append(names[:len(names):len(names)], espModuleNames...)
	}
	mods, err := Modules(modDir, names, optionalModules)
	if err != nil {
		return "", 0, err
	}
	rd, err := os.CreateTemp(dir, ".nixvm-vm-initramfs-*")
	if err != nil {
		return "", 0, fmt.Errorf("vm: %w", err)
	}
	err = WriteInitramfs(rd, initData, mods, guest)
	if cerr := rd.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(rd.Name())
		return "", 0, fmt.Errorf("vm: write the initramfs: %w", err)
	}
	return rd.Name(), len(mods), nil
}

// bootStage boots cfg (an initramfs with nmods modules) with each
// accelerator of opts in turn until one starts the guest, and checks what
// the guest reported.
func bootStage(ctx context.Context, opts Options, cfg Config, nmods int) (*Result, error) {
	list := accels(opts.Accel)
	probeFailed := false
	for i, a := range list {
		cfg.Accel = a
		argv := Cmdline(cfg)
		probe := time.Duration(0)
		if i < len(list)-1 {
			probe = opts.ProbeTimeout
		}
		fmt.Fprintf(opts.Log, "vm: booting %s with %s (%d modules, timeout %s)\n", cfg.Kernel, a, nmods, opts.Timeout)
		bootStart := time.Now()
		out, err := boot(ctx, argv, opts.Log, opts.Timeout, probe)
		if i < len(list)-1 && (errors.Is(err, errProbe) || (out != nil && !out.started)) {
			fmt.Fprintf(opts.Log, "vm: KVM did not start the guest within %s (/dev/kvm exists but does not work here); falling back to TCG\n", opts.ProbeTimeout)
			probeFailed = true
			continue
		}
		if err := guestError(out, err, argv, opts.Timeout); err != nil {
			return nil, err
		}
		return &Result{Accel: a, Boot: time.Since(bootStart), KVMProbeFailed: probeFailed}, nil
	}
	return nil, errors.New("vm: BUG: no accelerator tried")
}

// guestError is the error of a boot that did not end with
// switch-to-configuration's exit status 0, with the guest's last output and
// the QEMU command line that reproduces it.
func guestError(out *outcome, err error, argv []string, timeout time.Duration) error {
	if out == nil {
		return err
	}
	repro := "\nreproduce the boot with (the initramfs is deleted; keep it with a copy):\n  " + shquote.Join(argv)
	switch {
	case errors.Is(err, ErrTimeout):
		return fmt.Errorf("%w: killed after %s; the guest's last output:\n%s%s", ErrTimeout, timeout, indent(out.tail), repro)
	case err != nil:
		return fmt.Errorf("%w; the guest's last output:\n%s%s", err, indent(out.tail), repro)
	case out.errMsg != "":
		return fmt.Errorf("%w: %s; the guest's last output:\n%s%s", ErrGuestError, out.errMsg, indent(out.tail), repro)
	case !out.exited:
		return fmt.Errorf("%w; the guest's last output:\n%s%s", ErrNoExitStatus, indent(out.tail), repro)
	case out.exit != 0:
		return fmt.Errorf("%w: %s exited with status %d; its output:\n%s", ErrGuestFailed, strings.Join(Command, " "), out.exit, indent(out.tail))
	}
	return nil
}

func indent(lines []string) string {
	if len(lines) == 0 {
		return "  (none)"
	}
	return "  " + strings.Join(lines, "\n  ")
}
