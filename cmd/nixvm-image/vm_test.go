package main

// End-to-end tests of the VM stage: real QEMU (TCG), the bootable fixture
// built with the real Nix, and boots of the built images under SeaBIOS and
// OVMF. Reproduce a boot by hand with the command lines they print.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/partition"
	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

var (
	staticOnce sync.Once
	staticBin  string
	staticErr  error
)

// staticNixvmImage builds a static nixvm-image (CGO_ENABLED=0) once per test
// process, for the VM's /init: the test binary itself is dynamically linked.
func staticNixvmImage(t *testing.T) string {
	t.Helper()
	goTool := testutil.NeedTool(t, "go")[0]
	staticOnce.Do(func() {
		staticBin = filepath.Join(testProcessDir, "nixvm-image")
		cmd := exec.Command(goTool, "build", "-trimpath", "-o", staticBin, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			staticErr = fmt.Errorf("%v: %v\n%s", cmd.Args, err, out)
		}
	})
	if staticErr != nil {
		t.Fatal(staticErr)
	}
	if err := vm.CheckStatic(staticBin); err != nil {
		t.Fatal(err)
	}
	return staticBin
}

func needVM(t *testing.T) {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.NeedTool(t, "qemu-system-x86_64", "qemu-img")
	if testing.Short() {
		t.Skip("VM test: skipped with -short")
	}
}

// bootMarker boots img (qcow2) from its own boot loader, without -kernel,
// under SeaBIOS or (efi) OVMF, and returns the serial output once the
// fixture's init reported; it fails the test when it does not.
func bootMarker(t *testing.T, img string, efi bool) string {
	t.Helper()
	args := []string{"-machine", "pc,accel=tcg", "-m", "512", "-nodefaults", "-nographic", "-no-reboot",
		"-serial", "stdio", "-nic", "none", "-snapshot",
		"-drive", "if=virtio,format=qcow2,file=" + img}
	if efi {
		code, vars := "/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"
		for _, f := range []string{code, vars} {
			if _, err := os.Stat(f); err != nil {
				testutil.Skip(t, "no OVMF (install ovmf): %v", err)
			}
		}
		myVars := filepath.Join(t.TempDir(), "OVMF_VARS.fd")
		b, err := os.ReadFile(vars)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(myVars, b, 0o644)
		args[1] = "q35,accel=tcg"
		args = append(args,
			"-drive", "if=pflash,format=raw,readonly=on,file="+code,
			"-drive", "if=pflash,format=raw,file="+myVars)
	}
	qemu := testutil.NeedTool(t, "qemu-system-x86_64")[0]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, args...)
	out, err := cmd.CombinedOutput()
	s := strings.ReplaceAll(string(out), "\r", "")
	if !strings.Contains(s, "@@nixvm-fixture-init bootable") {
		t.Fatalf("the image did not boot to the fixture's init (%v); reproduce with:\n  %s\nserial output (tail):\n%s",
			err, vm.ShellQuote(append([]string{qemu}, args...)), tail(s, 3000))
	}
	return s
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// partitions reads the partition table with sfdisk: the root partition is the
// last one, the ESP the one typed as such.
func partitions(t *testing.T, raw string) (root, esp partition.Extent) {
	t.Helper()
	sfdisk := testutil.NeedTool(t, "sfdisk")[0]
	var table sfdiskJSON
	if err := json.Unmarshal([]byte(mustRun(t, sfdisk, "--json", raw)), &table); err != nil {
		t.Fatal(err)
	}
	parts := table.PartitionTable.Partitions
	for _, p := range parts {
		if strings.EqualFold(p.Type, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B") {
			esp = partition.Extent{Start: p.Start * 512, Size: p.Size * 512}
		}
	}
	last := parts[len(parts)-1]
	return partition.Extent{Start: last.Start * 512, Size: last.Size * 512}, esp
}

// checkFileSystems runs e2fsck -fn on the root file system of a qcow2 image
// and fsck.vfat -n on its ESP, and returns the root file system's image.
func checkFileSystems(t *testing.T, img string) string {
	t.Helper()
	tools := testutil.NeedTool(t, "qemu-img", "e2fsck", "fsck.vfat")
	mustRun(t, tools[0], "check", img)
	raw := filepath.Join(t.TempDir(), "disk.raw")
	mustRun(t, tools[0], "convert", "-O", "raw", img, raw)
	root, esp := partitions(t, raw)
	rootImg := partitionFile(t, raw, root)
	if out, err := exec.Command(tools[1], "-fn", rootImg).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the root file system after the VM stage: %v\n%s", err, out)
	}
	if esp.Size > 0 {
		if out, err := exec.Command(tools[2], "-n", partitionFile(t, raw, esp)).CombinedOutput(); err != nil {
			t.Fatalf("fsck.vfat -n on the ESP after the VM stage: %v\n%s", err, out)
		}
	}
	return rootImg
}

// TestVMStageLegacy builds the bootable fixture with --accel auto (on hosts
// where /dev/kvm exists but hangs, the watchdog falls back to TCG), boots it
// from its MBR under SeaBIOS with no -kernel, checks the file systems, and
// builds it again as raw: the two builds hold the same bytes.
func TestVMStageLegacy(t *testing.T) {
	needVM(t)
	bin := staticNixvmImage(t)
	top := nixfixture.Bootable(t, "ok")
	dir := t.TempDir()
	img := filepath.Join(dir, "legacy.qcow2")
	start := time.Now()
	_, stderr, code := run(t, "build", "--toplevel", top, "-o", img, "--vm-init", bin, "--accel", "auto")
	if code != 0 {
		t.Fatalf("build: exit %d\n%s", code, stderr)
	}
	t.Logf("build with the VM stage (accel auto): %s", time.Since(start).Round(time.Millisecond))
	for _, w := range []string{
		"guest: switch-to-configuration: installing GRUB (i386-pc) on /dev/vda, core image at sector 1",
		"guest: switch-to-configuration: boot loader installed",
		"bootloader: installed by switch-to-configuration",
	} {
		if !strings.Contains(stderr, w) {
			t.Errorf("build output lacks %q:\n%s", w, stderr)
		}
	}
	if n := strings.Count(stderr, "falling back to TCG"); n > 1 {
		t.Errorf("the TCG fallback is reported %d times, want at most once", n)
	}
	rootImg := checkFileSystems(t, img)
	// grub.cfg as NixOS writes it: entries pointing into /nix/store.
	debugfs := testutil.NeedTool(t, "debugfs")[0]
	cfg := mustRun(t, debugfs, "-R", "cat /boot/grub/grub.cfg", rootImg)
	kernel, _ := filepath.EvalSymlinks(filepath.Join(top, "kernel"))
	for _, w := range []string{"linux ($drive1)" + kernel + " init=" + top + "/init", "initrd ($drive1)/nix/store/"} {
		if !strings.Contains(cfg, w) {
			t.Errorf("grub.cfg lacks %q:\n%s", w, cfg)
		}
	}
	out := bootMarker(t, img, false)
	if !strings.Contains(out, "initrd: root /dev/vda1, init "+top+"/init") {
		t.Errorf("GRUB's entry did not boot %s/init from the root file system:\n%s", top, tail(out, 2000))
	}

	raw := filepath.Join(dir, "legacy.raw")
	if _, stderr, code := run(t, "build", "--quiet", "--toplevel", top, "-o", raw, "--format", "raw", "--vm-init", bin, "--accel", "tcg"); code != 0 {
		t.Fatalf("second build: exit %d\n%s", code, stderr)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw).CombinedOutput(); err != nil {
		t.Errorf("two builds of the same system differ after the VM stage: %v\n%s", err, out)
	}
	if a, b := readManifestDigest(t, img), readManifestDigest(t, raw); a != b {
		t.Errorf("manifest digests differ: %s vs %s", a, b)
	}
}

// TestVMStageEFI builds --layout efi: switch-to-configuration installs
// systemd-boot into the ESP, and the image boots under OVMF.
func TestVMStageEFI(t *testing.T) {
	needVM(t)
	bin := staticNixvmImage(t)
	top := nixfixture.Bootable(t, "ok")
	img := filepath.Join(t.TempDir(), "efi.qcow2")
	_, stderr, code := run(t, "build", "--toplevel", top, "--layout", "efi", "-o", img, "--vm-init", bin, "--accel", "tcg")
	if code != 0 {
		t.Fatalf("build: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(stderr, "guest: switch-to-configuration: installing systemd-boot into the ESP at /boot") {
		t.Errorf("build output lacks the systemd-boot install:\n%s", stderr)
	}
	if strings.Contains(stderr, "installing GRUB") {
		t.Errorf("GRUB installed on an efi layout (no MBR, no bios_grub):\n%s", stderr)
	}
	checkFileSystems(t, img)
	out := bootMarker(t, img, true)
	if !strings.Contains(out, "initrd: root /dev/vda2") {
		t.Errorf("systemd-boot's entry did not mount the root partition:\n%s", tail(out, 2000))
	}
}

// TestBuildConfigNix runs `build CONFIG.nix` through the real nix-build with a
// fake <nixpkgs/nixos> on NIX_PATH (testdata/nixpkgs), which refuses
// configurations without nix/guest.nix's settings and builds the bootable
// fixture; and `build --flake` through the real nix build.
func TestBuildConfigNix(t *testing.T) {
	needVM(t)
	testutil.NeedTool(t, "nix-build")
	bin := staticNixvmImage(t)
	nixfixture.Bootable(t, "ok") // built with the test's Nix options
	testdata, err := filepath.Abs("../../testdata")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NIX_PATH", "nixpkgs="+filepath.Join(testdata, "nixpkgs"))
	t.Setenv("NIX_CONFIG", "substituters =\nsandbox = false")
	// The CLI's evaluation directory goes to a temp dir of this test's own,
	// which must be empty afterwards (other processes share os.TempDir()).
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)

	dir := t.TempDir()
	img := filepath.Join(dir, "baseline.qcow2")
	_, stderr, code := run(t, "build", filepath.Join(testdata, "vm", "baseline.nix"), "-o", img, "--vm-init", bin, "--accel", "tcg")
	if code != 0 {
		t.Fatalf("build baseline.nix: exit %d\n%s", code, stderr)
	}
	for _, w := range []string{
		"evaluating and building the system: nix-build '<nixpkgs/nixos>' -A system --arg configuration",
		`{ nixvm.layout = "legacy"; }`,
		"guest: switch-to-configuration: boot loader installed",
	} {
		if !strings.Contains(stderr, w) {
			t.Errorf("build output lacks %q:\n%s", w, stderr)
		}
	}
	checkFileSystems(t, img)
	if m, _ := filepath.Glob(filepath.Join(tmp, "*")); len(m) != 0 {
		t.Errorf("evaluation left files behind in TMPDIR: %v", m)
	}

	// The dry run evaluates the efi variant of the module and prints QEMU's
	// command line, writing nothing.
	dry := filepath.Join(dir, "dry.qcow2")
	stdout, stderr, code := run(t, "build", filepath.Join(testdata, "vm", "baseline.nix"), "--layout", "efi", "-o", dry, "--dry-run", "--accel", "tcg")
	if code != 0 {
		t.Fatalf("--dry-run: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(stdout, "qemu-system-x86_64 -machine pc,accel=tcg") || !strings.Contains(stdout, "and /dev/vda1 at /boot") {
		t.Errorf("--dry-run output:\n%s", stdout)
	}
	if _, err := os.Stat(dry); err == nil {
		t.Error("--dry-run wrote the image")
	}

	// --flake: nix build of nixosConfigurations.baseline, extended with the
	// module (a dry run: the VM stage is the same as above).
	testutil.NeedTool(t, "nix")
	t.Setenv("NIXVM_FAKE_NIXPKGS", filepath.Join(testdata, "nixpkgs"))
	top := nixfixture.Bootable(t, "ok")
	stdout, stderr, code = run(t, "build", "--flake", filepath.Join(testdata, "vm", "flake")+"#baseline", "-o", dry, "--dry-run", "--accel", "tcg")
	if code != 0 {
		t.Fatalf("--flake --dry-run: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(stderr, "extendModules") || !strings.Contains(stdout, "-kernel "+top+"/kernel") {
		t.Errorf("--flake: want nix build with extendModules and the fixture's kernel\nstdout:\n%s\nstderr:\n%s", stdout, stderr)
	}

	// A configuration whose switch-to-configuration fails.
	bad := filepath.Join(dir, "failing.qcow2")
	_, stderr, code = run(t, "build", filepath.Join(testdata, "vm", "failing.nix"), "-o", bad, "--vm-init", bin, "--accel", "tcg")
	if code != exitError || !strings.Contains(stderr, "simulated failure") {
		t.Errorf("failing.nix: got exit %d, want %d with the guest's output\n%s", code, exitError, stderr)
	}
	if _, err := os.Stat(bad); err == nil {
		t.Error("failing.nix left an image")
	}

	// No <nixpkgs> on NIX_PATH.
	t.Setenv("NIX_PATH", "")
	_, stderr, code = run(t, "build", filepath.Join(testdata, "vm", "baseline.nix"), "-o", filepath.Join(dir, "x.qcow2"))
	if code != exitError || !strings.Contains(stderr, "set NIX_PATH") {
		t.Errorf("without NIX_PATH: got exit %d, want %d and a hint naming NIX_PATH\n%s", code, exitError, stderr)
	}
}

// TestVMStageFailures: switch-to-configuration fails (the build fails with
// its output and leaves nothing), hangs (killed by --vm-timeout), and a
// system without a kernel (the error names --kernel) or with a dynamic /init.
func TestVMStageFailures(t *testing.T) {
	needVM(t)
	bin := staticNixvmImage(t)
	sh, _ := filepath.EvalSymlinks(testutil.NeedTool(t, "sh")[0])
	for _, tc := range []struct {
		name, variant string
		args          []string
		want          []string
		maxTime       time.Duration
	}{
		{"switch fails", "fail", []string{"--vm-init", bin, "--accel", "tcg"},
			[]string{"simulated failure: cannot install the boot loader", "exited with status 3"}, 3 * time.Minute},
		{"guest hangs", "hang", []string{"--vm-init", bin, "--accel", "tcg", "--vm-timeout", "45s"},
			[]string{"did not finish in time: killed after 45s (--vm-timeout)", "hanging on purpose", "reproduce the boot"}, 3 * time.Minute},
		{"no kernel", "nokernel", []string{"--vm-init", bin},
			[]string{"has no kernel", "pass --kernel"}, 30 * time.Second},
		{"dynamic init", "ok", []string{"--vm-init", sh, "--accel", "tcg"},
			[]string{"is dynamically linked", "CGO_ENABLED=0"}, 30 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := nixfixture.Bootable(t, tc.variant)
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			start := time.Now()
			_, stderr, code := run(t, append([]string{"build", "--toplevel", top, "-o", img}, tc.args...)...)
			if d := time.Since(start); d > tc.maxTime {
				t.Errorf("took %s, want at most %s", d, tc.maxTime)
			}
			if code != exitError {
				t.Errorf("exit %d, want %d\n%s", code, exitError, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("output lacks %q:\n%s", w, stderr)
				}
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				var names []string
				for _, e := range ents {
					names = append(names, e.Name())
				}
				t.Errorf("left in the output directory: %v", names)
			}
		})
	}
}

// TestBuildVMFlags checks flag validation that needs no VM.
func TestBuildVMFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"build", "--toplevel", "/nix/store/x", "-o", "x", "--accel", "hvf"}, exitUsage, `--accel: vm: unknown accelerator: got "hvf"`},
		{[]string{"build", "--toplevel", "/nix/store/x", "-o", "x", "--vm-timeout", "-1s"}, exitUsage, "--vm-timeout"},
		{[]string{"build", "a.nix", "--flake", ".#x", "-o", "x"}, exitUsage, "give one of CONFIG.nix, --flake"},
		{[]string{"build", "a.nix", "b.nix", "-o", "x"}, exitUsage, `unexpected argument "b.nix"`},
		{[]string{"build", "/nonexistent/config.nix", "-o", "x"}, exitUsage, "CONFIG.nix"},
		{[]string{"build", "--flake", "nohash", "-o", "x"}, exitUsage, "want FLAKE#NAME"},
	} {
		_, stderr, code := run(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: got exit %d, %q; want exit %d with %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
}

func TestNixCommand(t *testing.T) {
	for _, tc := range []struct {
		config, flake string
		layout        partition.Layout
		want          []string
	}{
		{"/etc/nixos/baseline.nix", "", partition.Legacy, []string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration",
			`{ imports = [ /etc/nixos/baseline.nix /tmp/g.nix { nixvm.layout = "legacy"; } ]; }`, "--out-link", "/tmp/result"}},
		{"/my dir/c.nix", "", partition.EFI, []string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration",
			`{ imports = [ (/. + "/my dir/c.nix") /tmp/g.nix { nixvm.layout = "efi"; } ]; }`, "--out-link", "/tmp/result"}},
		{"", "github:me/sys#web", partition.Hybrid, []string{"nix", "--extra-experimental-features", "nix-command flakes", "build", "--impure", "--expr",
			`let f = builtins.getFlake "github:me/sys"; in (f.nixosConfigurations."web".extendModules { modules = [ /tmp/g.nix { nixvm.layout = "hybrid"; } ]; }).config.system.build.toplevel`,
			"--out-link", "/tmp/result"}},
		{"", "/srv/flake#baseline", partition.Legacy, []string{"nix", "--extra-experimental-features", "nix-command flakes", "build", "--impure", "--expr",
			`let f = builtins.getFlake "path:/srv/flake"; in (f.nixosConfigurations."baseline".extendModules { modules = [ /tmp/g.nix { nixvm.layout = "legacy"; } ]; }).config.system.build.toplevel`,
			"--out-link", "/tmp/result"}},
	} {
		got, err := nixCommand(tc.config, tc.flake, "/tmp/g.nix", tc.layout, "/tmp/result")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Join(got, "\x00") != strings.Join(tc.want, "\x00") {
			t.Errorf("nixCommand(%q, %q):\ngot  %q\nwant %q", tc.config, tc.flake, got, tc.want)
		}
	}
}
