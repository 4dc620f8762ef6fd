package main

// End-to-end tests of build's Nix front door: CONFIG.nix through the real
// nix-build and --flake through the real nix build, against the fake
// <nixpkgs/nixos> of testdata/nixpkgs (a small module system that fails as
// lib/modules.nix does on duplicate options and conflicting definitions, and
// builds a NixOS-shaped system whose init runs the configuration's boot-time
// units and whose switch-to-configuration installs the boot loaders the
// configuration asks for). Then the images boot in QEMU (TCG).

import (
	"fmt"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

var (
	resizeOnce sync.Once
	resizeErr  error
)

// staticResize builds a static nixvm-resize beside staticNixvmImage's
// binary, as make build and the Nix package install the two: that
// nixvm-image then adds it to the systems it builds by itself.
func staticResize(t *testing.T) string {
	t.Helper()
	bin := staticNixvmImage(t)
	p := filepath.Join(filepath.Dir(bin), "nixvm-resize")
	resizeOnce.Do(func() {
		cmd := exec.Command(testutil.NeedTool(t, "go")[0], "build", "-trimpath", "-o", p, "../nixvm-resize")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			resizeErr = fmt.Errorf("%v: %v\n%s", cmd.Args, err, out)
		}
	})
	if resizeErr != nil {
		t.Fatal(resizeErr)
	}
	return p
}

// fakeNixpkgs points NIX_PATH at testdata/nixpkgs and makes Nix build
// offline; it returns the absolute testdata directory.
func fakeNixpkgs(t *testing.T) string {
	t.Helper()
	testutil.NeedRoot(t)
	testutil.NeedTool(t, "nix-build", "nix-instantiate")
	nixfixture.Bootable(t, "ok") // the fake system's base, built with the test's Nix options
	testdata, err := filepath.Abs("../../testdata")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NIX_PATH", "nixpkgs="+filepath.Join(testdata, "nixpkgs"))
	t.Setenv("NIX_CONFIG", "substituters =\nsandbox = false")
	return testdata
}

// writeConfig writes a NixOS configuration importing testdata/vm/baseline.nix
// and imports (Nix list items), with body (module body text), and returns
// its path.
func writeConfig(t *testing.T, testdata, imports, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "configuration.nix")
	text := fmt.Sprintf("{ lib, ... }: {\n  imports = [ %s %s ];\n%s\n}\n", filepath.Join(testdata, "vm", "baseline.nix"), imports, body)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func storePathValid(t *testing.T, p string) bool {
	t.Helper()
	ns := testutil.NeedTool(t, "nix-store")[0]
	return exec.Command(ns, "--check-validity", p).Run() == nil
}

// TestBuildConfigNix runs `build CONFIG.nix` through the real nix-build:
// the fake nixpkgs refuses configurations without nix/guest.nix's settings,
// so the build shows that it added the module; --out-link keeps the system;
// --dry-run of a built system prints the VM stage; a failing
// switch-to-configuration fails the build; without <nixpkgs> the error says
// how to give it.
func TestBuildConfigNix(t *testing.T) {
	needVM(t)
	testdata := fakeNixpkgs(t)
	bin := staticNixvmImage(t)
	resize := staticResize(t)
	// The CLI's evaluation directory goes to a temp dir of this test's own,
	// which must be empty afterwards (other processes share os.TempDir()).
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)

	dir := t.TempDir()
	img := filepath.Join(dir, "baseline.qcow2")
	link := filepath.Join(dir, "system")
	baseline := filepath.Join(testdata, "vm", "baseline.nix")
	_, stderr, code := run(t, "build", baseline, "-o", img, "--vm-init", bin, "--nixvm-resize", resize, "--accel", "tcg", "--out-link", link)
	if code != 0 {
		t.Fatalf("build baseline.nix: exit %d\n%s", code, stderr)
	}
	for _, w := range []string{
		"evaluating and building the system: nix-build '<nixpkgs/nixos>' -A system --arg configuration",
		`nixvm.layout = lib.mkForce "legacy"`,
		"guest: switch-to-configuration: installing GRUB (i386-pc) on /dev/vda, core image at sector 1",
		"guest: switch-to-configuration: boot loader installed",
	} {
		if !strings.Contains(stderr, w) {
			t.Errorf("build output lacks %q:\n%s", w, stderr)
		}
	}
	checkFileSystems(t, img)
	top, err := os.Readlink(link)
	if err != nil || !strings.HasPrefix(top, "/nix/store/") || !strings.HasSuffix(top, "-nixos-system-baseline-fake") {
		t.Fatalf("--out-link %s: %q, %v; want the built system", link, top, err)
	}
	if m, _ := filepath.Glob(filepath.Join(tmp, "*")); len(m) != 0 {
		t.Errorf("evaluation left files behind in TMPDIR: %v", m)
	}

	// The dry run of the system just built evaluates it, prints the build
	// it would run and the VM stage, and writes nothing.
	dry := filepath.Join(dir, "dry.qcow2")
	stdout, stderr, code := run(t, "build", baseline, "-o", dry, "--dry-run", "--accel", "tcg", "--nixvm-resize", resize)
	if code != 0 {
		t.Fatalf("--dry-run: exit %d\n%s", code, stderr)
	}
	for _, w := range []string{
		"# the build would run (--dry-run only evaluates, building nothing):\nnix-build '<nixpkgs/nixos>' -A system",
		"# system: " + top + " (already built)",
		"qemu-system-x86_64 -machine pc,accel=tcg",
		"-kernel " + top + "/kernel",
	} {
		if !strings.Contains(stdout, w) {
			t.Errorf("--dry-run output lacks %q:\n%s", w, stdout)
		}
	}
	if !strings.Contains(stderr, "evaluating the system: nix-instantiate --eval --json '<nixpkgs/nixos>' -A system.outPath") {
		t.Errorf("--dry-run: want an evaluation only:\n%s", stderr)
	}
	if _, err := os.Stat(dry); err == nil {
		t.Error("--dry-run wrote the image")
	}

	// A configuration whose switch-to-configuration fails.
	bad := filepath.Join(dir, "failing.qcow2")
	_, stderr, code = run(t, "build", filepath.Join(testdata, "vm", "failing.nix"), "-o", bad, "--vm-init", bin, "--nixvm-resize", resize, "--accel", "tcg")
	if code != exitError || !strings.Contains(stderr, "simulated failure") {
		t.Errorf("failing.nix: got exit %d, want %d with the guest's output\n%s", code, exitError, stderr)
	}
	if _, err := os.Stat(bad); err == nil {
		t.Error("failing.nix left an image")
	}

	// No <nixpkgs> on NIX_PATH.
	t.Setenv("NIX_PATH", "")
	_, stderr, code = run(t, "build", baseline, "-o", filepath.Join(dir, "x.qcow2"))
	if code != exitError || !strings.Contains(stderr, "set NIX_PATH") || !strings.Contains(stderr, "-I nixpkgs=PATH") {
		t.Errorf("without NIX_PATH: got exit %d, want %d and a hint naming NIX_PATH and -I\n%s", code, exitError, stderr)
	}
	// -I passes through: the same build finds <nixpkgs> again (a dry run).
	_, stderr, code = run(t, "build", baseline, "-I", "nixpkgs="+filepath.Join(testdata, "nixpkgs"), "--dry-run", "--nixvm-resize", resize)
	if code != 0 || !strings.Contains(stderr, "-I nixpkgs="+filepath.Join(testdata, "nixpkgs")) {
		t.Errorf("-I nixpkgs=…: exit %d\n%s", code, stderr)
	}
}

// TestDryRunBuildsNothing: --dry-run of a configuration nobody built prints
// the system's store path, which stays absent, and writes no image; the
// evaluation error paths: a failed assertion names the fix.
func TestDryRunBuildsNothing(t *testing.T) {
	testdata := fakeNixpkgs(t)
	host := fmt.Sprintf("dry-%d", time.Now().UnixNano())
	cfg := writeConfig(t, testdata, "", fmt.Sprintf("  networking.hostName = lib.mkForce %q;", host))
	out := filepath.Join(t.TempDir(), "x.qcow2")
	stdout, stderr, code := run(t, "build", cfg, "-o", out, "--dry-run", "--nixvm-resize", staticResize(t))
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	i := strings.Index(stdout, "# system: /nix/store/")
	if i < 0 || !strings.Contains(stdout, "-nixos-system-"+host+"-fake, not built") {
		t.Fatalf("want the system's path, not built:\n%s", stdout)
	}
	top := strings.TrimSuffix(strings.Fields(stdout[i:])[2], ",")
	if storePathValid(t, top) {
		t.Errorf("--dry-run built %s", top)
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("--dry-run wrote the image")
	}

	// No nixvm-resize anywhere: the guest module's assertion, with the fix.
	_, stderr, code = run(t, "build", cfg, "-o", out, "--dry-run")
	if code != exitError || !strings.Contains(stderr, "Failed assertions") || !strings.Contains(stderr, "pass --nixvm-resize FILE") {
		t.Errorf("without nixvm-resize: exit %d, want %d with the assertion and a hint\n%s", code, exitError, stderr)
	}
	// Unless growth is turned off.
	off := writeConfig(t, testdata, "", "  nixvm.resize.enable = false;")
	if _, stderr, code = run(t, "build", off, "-o", out, "--dry-run"); code != 0 {
		t.Errorf("nixvm.resize.enable = false: exit %d\n%s", code, stderr)
	}
}

// TestConfigNixModuleTwiceAndOwnRoot: a configuration that imports the guest
// module itself (a copy at another path, as a vendored module would be) and
// has its own root device evaluates: the module's key keeps one copy, and
// its fileSystems."/" is a default. A copy without the key fails as
// lib/modules.nix does, which shows the stub checks what the key fixes.
func TestConfigNixModuleTwiceAndOwnRoot(t *testing.T) {
	testdata := fakeNixpkgs(t)
	guest, err := os.ReadFile("../../nix/guest.nix")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "vendored-guest.nix")
	os.WriteFile(copyPath, guest, 0o644)
	noKey := filepath.Join(dir, "no-key.nix")
	os.WriteFile(noKey, []byte(strings.Replace(string(guest), "  key = ", "  # key = ", 1)), 0o644)
	resize := staticResize(t)
	for _, tc := range []struct {
		name, imports, body, want string
	}{
		{"imported twice", copyPath, "", ""},
		{"own root device", "", `  fileSystems."/" = { device = "/dev/disk/by-uuid/0f3c5b8e-0000-4000-8000-000000000001"; fsType = "ext4"; };`, ""},
		{"own root device, twice", `({ ... }: { fileSystems."/".device = "/dev/disk/by-uuid/b"; })`, `  fileSystems."/".device = "/dev/disk/by-uuid/a";`,
			"The option `fileSystems./.device' has conflicting definition values"},
		{"a copy without the key", noKey, "", "The option `nixvm.layout' in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeConfig(t, testdata, tc.imports, tc.body)
			stdout, stderr, code := run(t, "build", cfg, "--dry-run", "--nixvm-resize", resize)
			if tc.want != "" {
				if code != exitError || !strings.Contains(stderr, tc.want) {
					t.Errorf("exit %d, want %d with %q\n%s", code, exitError, tc.want, stderr)
				}
				return
			}
			if code != 0 || !strings.Contains(stdout, "# system: /nix/store/") {
				t.Errorf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
			}
		})
	}
}

// TestBuildFlake builds `--flake` from a flake in a git repository whose
// configuration imports the guest module itself, with an untracked file
// beside it: the flake is evaluated as a git flake (the untracked file does
// not reach the store: the configuration names the system after what it
// sees), and the module imported twice is harmless. The dry run and the
// build (without the VM stage) both run the real nix.
func TestBuildFlake(t *testing.T) {
	testdata := fakeNixpkgs(t)
	git := testutil.NeedTool(t, "git", "nix")[0]
	t.Setenv("NIXVM_FAKE_NIXPKGS", filepath.Join(testdata, "nixpkgs"))
	repo := t.TempDir()
	for _, f := range []string{"flake.nix", "configuration.nix"} {
		b, err := os.ReadFile(filepath.Join(testdata, "vm", "flake", f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(repo, f), b, 0o644)
	}
	guest, _ := os.ReadFile("../../nix/guest.nix")
	os.WriteFile(filepath.Join(repo, "nixvm-guest.nix"), guest, 0o644)
	gitRun := func(args ...string) {
		t.Helper()
		cmd := exec.Command(git, append([]string{"-C", repo}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
		}
	}
	gitRun("init", "-q")
	gitRun("add", "flake.nix", "configuration.nix", "nixvm-guest.nix")
	gitRun("commit", "-q", "-m", "flake")
	os.WriteFile(filepath.Join(repo, "old-image.qcow2"), []byte("an earlier image, untracked"), 0o644)
	resize := staticResize(t)
	t.Chdir(repo)

	stdout, stderr, code := run(t, "build", "--flake", ".#baseline", "--dry-run", "--nixvm-resize", resize)
	if code != 0 {
		t.Fatalf("--flake --dry-run: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(stderr, `builtins.getFlake "git+file://`+repo+`"`) || !strings.Contains(stderr, " eval --raw --impure --expr") {
		t.Errorf("--flake .: want a git flake, evaluated only:\n%s", stderr)
	}
	if !strings.Contains(stdout, "-nixos-system-flake-clean-fake") {
		t.Errorf("want the system of a flake that saw no untracked file:\n%s", stdout)
	}

	img := filepath.Join(t.TempDir(), "flake.qcow2")
	_, stderr, code = run(t, "build", "--flake", ".#nixosConfigurations.baseline", "-o", img, "--no-bootloader", "--nixvm-resize", resize, "--show-trace")
	if code != 0 {
		t.Fatalf("--flake build: exit %d\n%s", code, stderr)
	}
	if !strings.Contains(stderr, " build --impure --expr") || !strings.Contains(stderr, "--show-trace --out-link") {
		t.Errorf("want nix build with --show-trace:\n%s", stderr)
	}
	if _, err := os.Stat(img); err != nil {
		t.Error(err)
	}
	// Hostname default: no #NAME builds nixosConfigurations.<this host>,
	// which the flake does not have; the error lists what it has.
	host, _ := os.Hostname()
	_, stderr, code = run(t, "build", "--flake", ".", "--dry-run", "--nixvm-resize", resize)
	if code != exitError || !strings.Contains(stderr, `has no nixosConfigurations.\"`+host+`\" (it has: baseline)`) && !strings.Contains(stderr, `has no nixosConfigurations."`+host+`" (it has: baseline)`) {
		t.Errorf("--flake . on host %s: exit %d\n%s", host, code, stderr)
	}
}

// TestFirstBootGrowthConfigNix is the main path with nothing set: a
// nixvm-image installed beside its nixvm-resize (as make build and the Nix
// package install them) builds baseline.nix, which sets no nixvm option;
// the system it builds carries nixvm-resize, and the image, grown 4x, grows
// its root at first boot from its own MBR under SeaBIOS.
func TestFirstBootGrowthConfigNix(t *testing.T) {
	needVM(t)
	testdata := fakeNixpkgs(t)
	staticResize(t)
	bin := staticNixvmImage(t) // nixvm-resize is beside it
	dir := t.TempDir()
	img := filepath.Join(dir, "baseline.qcow2")
	link := filepath.Join(dir, "system")
	cmd := exec.Command(bin, "build", filepath.Join(testdata, "vm", "baseline.nix"), "-o", img, "--accel", "tcg", "--out-link", link)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", shquote.Join(cmd.Args), err, out)
	}
	top, _ := os.Readlink(link)
	closure := mustRun(t, testutil.NeedTool(t, "nix-store")[0], "-qR", top)
	if !strings.Contains(closure, "-nixvm-resize\n") {
		t.Errorf("the system's closure has no nixvm-resize:\n%s", closure)
	}
	if strings.Contains(closure, "nixvm-image") {
		t.Errorf("the system's closure carries nixvm-image:\n%s", closure)
	}

	built := vmtestVirtualSize(t, img)
	mustRun(t, "qemu-img", "resize", "-q", "-f", "qcow2", img, fmt.Sprint(4*built))
	out, argv, err := bootSerial(t, img, false)
	rc := vmtest.Markers(out, "fake-nixos unit nixvm-resize")
	boot := vmtest.Markers(out, "fake-nixos boot")
	done := vmtest.Markers(out, "fake-nixos done")
	if len(rc) != 1 || len(boot) != 1 || len(done) != 1 {
		t.Fatalf("the system did not boot and run its units (%v); reproduce with:\n  %s\nserial output (tail):\n%s", err, shquote.Join(argv), tail(out, 3000))
	}
	if rc[0] != "rc=0" || !strings.Contains(out, "done: / grew from") {
		t.Errorf("nixvm-resize at first boot: %s\n%s", rc[0], tail(out, 2000))
	}
	before, after := kib(t, boot[0]), kib(t, done[0])
	if after < 3*before {
		t.Errorf("df of / at first boot: %d KiB before the unit, %d after; want it grown about 4x", before, after)
	}
	t.Logf("first boot under SeaBIOS: / grew from %d KiB to %d KiB", before, after)
}

// kib reads df_kib=N from a marker's text.
func kib(t *testing.T, s string) int64 {
	t.Helper()
	i := strings.Index(s, "df_kib=")
	if i < 0 {
		t.Fatalf("no df_kib in %q", s)
	}
	n, err := strconv.ParseInt(strings.Fields(s[i+len("df_kib="):])[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func vmtestVirtualSize(t *testing.T, img string) int64 {
	t.Helper()
	info := mustRun(t, "qemu-img", "info", "--output=json", img)
	i := strings.Index(info, `"virtual-size":`)
	if i < 0 {
		t.Fatalf("qemu-img info: %s", info)
	}
	n, err := strconv.ParseInt(strings.Trim(strings.Fields(info[i+len(`"virtual-size":`):])[0], ","), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestHybridBoots builds --layout hybrid through CONFIG.nix: the guest
// module asks for GRUB for BIOS and for UEFI (efiSupport,
// efiInstallAsRemovable), and the image boots from its own boot loader
// under SeaBIOS and under OVMF, in QEMU and as the host module's guest
// under libvirtd (firmware = "bios" and "efi").
func TestHybridBoots(t *testing.T) {
	needVM(t)
	testdata := fakeNixpkgs(t)
	bin := staticNixvmImage(t)
	img := filepath.Join(t.TempDir(), "hybrid.qcow2")
	_, stderr, code := run(t, "build", filepath.Join(testdata, "vm", "baseline.nix"), "--layout", "hybrid", "-o", img,
		"--vm-init", bin, "--nixvm-resize", staticResize(t), "--accel", "tcg")
	if code != 0 {
		t.Fatalf("build --layout hybrid: exit %d\n%s", code, stderr)
	}
	for _, w := range []string{
		"guest: switch-to-configuration: installing GRUB (i386-pc) on /dev/vda",
		"guest: switch-to-configuration: installing GRUB (x86_64-efi) as /boot/EFI/BOOT/BOOTX64.EFI",
	} {
		if !strings.Contains(stderr, w) {
			t.Errorf("build output lacks %q:\n%s", w, stderr)
		}
	}
	checkFileSystems(t, img)
	for _, efi := range []bool{false, true} {
		name := map[bool]string{false: "SeaBIOS", true: "OVMF"}[efi]
		out, argv, err := bootSerial(t, img, efi)
		if len(vmtest.Markers(out, "fake-nixos done")) != 1 || !strings.Contains(out, "initrd: root /dev/vda3") {
			t.Errorf("hybrid image under %s did not boot its system (%v); reproduce with:\n  %s\nserial output (tail):\n%s", name, err, shquote.Join(argv), tail(out, 3000))
		} else {
			t.Logf("hybrid image booted under %s", name)
		}
	}
	// And as the host module's guest under libvirtd, firmware bios and efi.
	checkLibvirtBoots(t, img)
}
