package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/nixvm-image/nixvm-image/cpio"
	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

func TestCmdline(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string // must appear, in this order, as consecutive argv pairs/items
		not  []string
	}{
		{"tcg defaults", Config{Accel: AccelTCG, Kernel: "/k", Initrd: "/i", Disk: "/d.raw", Epoch: 1},
			[]string{"qemu-system-x86_64", "-machine pc,accel=tcg", "-cpu max", "-m 512", "-rtc base=1970-01-01T00:00:01,clock=vm",
				"-kernel /k", "-initrd /i", "-drive if=virtio,format=raw,cache=unsafe,file=/d.raw"}, []string{"host"}},
		{"kvm", Config{Accel: AccelKVM, Kernel: "/k", Initrd: "/i", Disk: "/d", MemoryMiB: 1024, Epoch: 1700000000},
			[]string{"-machine pc,accel=kvm", "-cpu host", "-m 1024", "-rtc base=2023-11-14T22:13:20,clock=vm"}, []string{"accel=tcg"}},
		{"auto is never passed to qemu", Config{Accel: AccelAuto, QEMU: "/opt/qemu", Disk: "/d"},
			[]string{"/opt/qemu", "-machine pc,accel=tcg"}, nil},
		{"comma in the disk path is escaped", Config{Accel: AccelTCG, Disk: "/tmp/a,b.raw"},
			[]string{"-drive if=virtio,format=raw,cache=unsafe,file=/tmp/a,,b.raw"}, nil},
		{"extra kernel parameters", Config{Accel: AccelTCG, Append: "debug"},
			[]string{"-append console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init debug"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			argv := Cmdline(tc.cfg)
			if !reflect.DeepEqual(argv, Cmdline(tc.cfg)) {
				t.Fatal("Cmdline is not pure")
			}
			joined := "\x00" + strings.Join(argv, "\x00") + "\x00"
			for _, w := range tc.want {
				k, v, _ := strings.Cut(w, " ")
				item := "\x00" + k + "\x00"
				if strings.HasPrefix(k, "-") && v != "" {
					item = "\x00" + k + "\x00" + v + "\x00"
				}
				if !strings.Contains(joined, item) {
					t.Errorf("argv lacks %q:\n%s", w, shquote.Join(argv))
				}
			}
			for _, n := range tc.not {
				if strings.Contains(joined, n) {
					t.Errorf("argv has %q:\n%s", n, shquote.Join(argv))
				}
			}
			for _, must := range []string{"-no-reboot", "-nodefaults", "-nographic"} {
				if !strings.Contains(joined, "\x00"+must+"\x00") {
					t.Errorf("argv lacks %s", must)
				}
			}
		})
	}
}

func TestParseAccel(t *testing.T) {
	for in, want := range map[string]Accel{"": AccelAuto, "auto": AccelAuto, "kvm": AccelKVM, "tcg": AccelTCG} {
		if got, err := ParseAccel(in); err != nil || got != want {
			t.Errorf("ParseAccel(%q): got %q, %v, want %q", in, got, err, want)
		}
	}
	if _, err := ParseAccel("hvf"); !errors.Is(err, ErrAccel) || !strings.Contains(err.Error(), `got "hvf"`) {
		t.Errorf("ParseAccel(hvf): got %v, want ErrAccel naming the value", err)
	}
}

func TestStripControl(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                         "plain",
		"\x1b[2J\x1b[0mSeaBIOS (v)":     "SeaBIOS (v)",
		"\x1bcBooting\x1b[?7l from ROM": "Booting from ROM",
		"bell\x07 tab\t":                "bell tab\t",
	} {
		if got := stripControl(in); got != want {
			t.Errorf("stripControl(%q): got %q, want %q", in, got, want)
		}
	}
}

// fakeModules writes a modules directory: a needs b, b needs c (zstd), d is
// built in.
func fakeModules(t *testing.T) string {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "kernel/x"), 0o755)
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("kernel/x/a-mod.ko", []byte("module a"))
	write("kernel/x/b.ko", []byte("module b"))
	var zc bytes.Buffer
	zw, _ := zstd.NewWriter(&zc)
	zw.Write([]byte("module c"))
	zw.Close()
	write("kernel/x/c.ko.zst", zc.Bytes())
	write("modules.dep", []byte("kernel/x/a-mod.ko: kernel/x/b.ko kernel/x/c.ko.zst\nkernel/x/b.ko: kernel/x/c.ko.zst\nkernel/x/c.ko.zst:\n"))
	write("modules.builtin", []byte("kernel/y/d.ko\n"))
	return dir
}

func TestModules(t *testing.T) {
	dir := fakeModules(t)
	mods, err := Modules(dir, []string{"a_mod", "d", "b", "opt"}, map[string]bool{"opt": true})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range mods {
		got = append(got, m.Name+"="+string(m.Data))
	}
	want := []string{"c.ko=module c", "b.ko=module b", "a_mod.ko=module a"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v (dependencies first, zstd decompressed, built-in and optional skipped)", got, want)
	}
	if _, err := Modules(dir, []string{"nope"}, nil); !errors.Is(err, ErrModules) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("missing module: got %v, want ErrModules naming it", err)
	}
	if _, err := Modules(t.TempDir(), []string{"a"}, nil); !errors.Is(err, ErrModules) {
		t.Errorf("no modules.dep: got %v, want ErrModules", err)
	}
}

func TestModulesDir(t *testing.T) {
	dir := t.TempDir()
	rel := filepath.Join(dir, "lib/modules/6.1.0-test")
	os.MkdirAll(rel, 0o755)
	os.WriteFile(filepath.Join(rel, "modules.dep"), nil, 0o644)
	for in, want := range map[string]string{dir: rel, rel: rel} {
		if got, err := modulesDir(in); err != nil || got != want {
			t.Errorf("modulesDir(%s): got %s, %v, want %s", in, got, err, want)
		}
	}
	os.MkdirAll(filepath.Join(dir, "lib/modules/6.2"), 0o755)
	os.WriteFile(filepath.Join(dir, "lib/modules/6.2/modules.dep"), nil, 0o644)
	if _, err := modulesDir(dir); !errors.Is(err, ErrModules) || !strings.Contains(err.Error(), "several kernels") {
		t.Errorf("two releases: got %v, want ErrModules", err)
	}
	if _, err := modulesDir(t.TempDir()); !errors.Is(err, ErrModules) {
		t.Errorf("none: got %v, want ErrModules", err)
	}
}

func TestWriteInitramfs(t *testing.T) {
	mods := []Module{{Name: "c.ko", Data: []byte("cc")}, {Name: "b.ko", Data: []byte("bbb")}}
	cfg := GuestConfig{Root: "/dev/vda2", ESP: "/dev/vda1", Command: Command, Env: Env}
	var a, b bytes.Buffer
	if err := WriteInitramfs(&a, []byte("\x7fELF init"), mods, cfg); err != nil {
		t.Fatal(err)
	}
	if err := WriteInitramfs(&b, []byte("\x7fELF init"), mods, cfg); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("two initramfs of the same inputs differ")
	}
	r := cpio.NewReader(bytes.NewReader(a.Bytes()))
	files := map[string]string{}
	var names []string
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		data, _ := io.ReadAll(r)
		files[h.Name] = string(data)
		if h.Name == "init" && h.Mode&0o111 == 0 {
			t.Errorf("/init mode %o is not executable", h.Mode)
		}
		if h.Name == "dev/console" && h.Mode&cpio.TypeMask != cpio.TypeChar {
			t.Errorf("dev/console mode %o, want a character device", h.Mode)
		}
	}
	if files["init"] != "\x7fELF init" || files["lib/modules/c.ko"] != "cc" || files["lib/modules/b.ko"] != "bbb" {
		t.Errorf("contents: %v", names)
	}
	var got GuestConfig
	if err := json.Unmarshal([]byte(files[guestConfigPath]), &got); err != nil {
		t.Fatal(err)
	}
	cfg.Modules = []string{"c.ko", "b.ko"}
	if !reflect.DeepEqual(got, cfg) {
		t.Errorf("guest config: got %+v, want %+v", got, cfg)
	}
}

func TestCheckStatic(t *testing.T) {
	tools := testutil.NeedTool(t, "busybox", "sh")
	if err := CheckStatic(tools[0]); err != nil {
		t.Errorf("busybox (Debian busybox-static): %v", err)
	}
	sh, _ := filepath.EvalSymlinks(tools[1])
	if err := CheckStatic(sh); !errors.Is(err, ErrNotStatic) || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("%s: got %v, want ErrNotStatic naming CGO_ENABLED=0", sh, err)
	}
}

// testDisk writes a small legacy disk with an ext4 root file system made by
// our writer.
func testDisk(t *testing.T) (string, *partition.Plan) {
	t.Helper()
	plan, err := partition.NewPlan(partition.Legacy, 32<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(plan.DiskSize)
	if err := plan.WriteTable(f, partition.DeriveIDs([]byte("test"))); err != nil {
		t.Fatal(err)
	}
	w, err := ext4.NewWriter(io.NewOffsetWriter(f, plan.Root.Start), ext4.Options{Size: plan.Root.Size, Label: "nixos", Time: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*ext4.Header{
		{Name: ".", Type: ext4.TypeDir, Mode: 0o755, Mtime: 1},
		{Name: "nix", Type: ext4.TypeDir, Mode: 0o755, Mtime: 1},
	} {
		if err := w.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return disk, plan
}

// fakeQEMU writes a script that stands in for QEMU: it prints what the
// guest would, depending on FAKE_MODE and the accelerator in its argv.
func fakeQEMU(t *testing.T, mode string) string {
	t.Helper()
	sh := testutil.NeedTool(t, "sh")[0]
	p := filepath.Join(t.TempDir(), "qemu")
	script := `#!` + sh + `
case "$*" in *accel=kvm*) kvm=1 ;; esac
mode='` + mode + `'
if [ -n "$kvm" ] && [ "$mode" = kvmhang ]; then echo "SeaBIOS"; exec sleep 60; fi
echo "SeaBIOS (version x)"
echo "@@nixvm-vm-start"
case "$mode" in
ok|kvmhang) echo "switch-to-configuration: installed"; echo "@@nixvm-vm-exit 0" ;;
fail) echo "switch-to-configuration: simulated failure"; echo "@@nixvm-vm-exit 3" ;;
hang) echo "hanging"; exec sleep 60 ;;
error) echo "@@nixvm-vm-error mount the root file system /dev/vda1: no such device" ;;
silent) ;;
esac
`
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStageFakeQEMU runs Stage against a QEMU stand-in: exit status, error
// marker, timeout, the KVM watchdog and the guest output prefix.
func TestStageFakeQEMU(t *testing.T) {
	bb := testutil.NeedTool(t, "busybox")[0] // any static binary will do as /init
	mods := fakeModules(t)
	kernel := filepath.Join(t.TempDir(), "bzImage")
	os.WriteFile(kernel, []byte("kernel"), 0o644)
	// The real module names the stage asks for, mapped onto fake files.
	dep := "kernel/x/virtio_pci.ko:\nkernel/x/virtio_blk.ko: kernel/x/virtio_pci.ko\nkernel/x/ext4.ko:\n"
	for _, n := range []string{"virtio_pci", "virtio_blk", "ext4"} {
		os.WriteFile(filepath.Join(mods, "kernel/x", n+".ko"), []byte(n), 0o644)
	}
	os.WriteFile(filepath.Join(mods, "modules.dep"), []byte(dep), 0o644)

	for _, tc := range []struct {
		mode    string
		accel   Accel
		wantErr error
		want    []string // in the error or the log
	}{
		{"ok", AccelTCG, nil, []string{"guest: switch-to-configuration: installed", "guest: SeaBIOS (version x)"}},
		{"fail", AccelTCG, ErrGuestFailed, []string{"status 3", "simulated failure"}},
		{"error", AccelTCG, ErrGuestError, []string{"no such device", "reproduce the boot"}},
		{"hang", AccelTCG, ErrTimeout, []string{"killed after 2s", "hanging"}},
		{"silent", AccelTCG, ErrNoExitStatus, nil},
		{"kvmhang", AccelAuto, nil, []string{"falling back to TCG"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			if tc.accel == AccelAuto && !kvmUsable() {
				t.Skip("no usable /dev/kvm: auto goes straight to TCG")
			}
			disk, plan := testDisk(t)
			var log bytes.Buffer
			start := time.Now()
			res, err := Stage(context.Background(), Options{
				Toplevel: "", Kernel: kernel, Modules: mods, Init: bb,
				QEMU: fakeQEMU(t, tc.mode), Accel: tc.accel,
				Timeout: 2 * time.Second, ProbeTimeout: time.Second, Log: &log,
			}, disk, plan)
			if time.Since(start) > 20*time.Second {
				t.Errorf("took %s", time.Since(start))
			}
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("%v\nlog:\n%s", err, log.String())
				}
				if res.Accel != AccelTCG || res.KVMProbeFailed != (tc.accel == AccelAuto) {
					t.Errorf("accel: got %s (KVM probe failed: %v), want tcg (%v)", res.Accel, res.KVMProbeFailed, tc.accel == AccelAuto)
				}
			} else if !errors.Is(err, tc.wantErr) {
				t.Fatalf("got %v, want %v\nlog:\n%s", err, tc.wantErr, log.String())
			}
			all := log.String()
			if err != nil {
				all += err.Error()
			}
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("output lacks %q:\n%s", w, all)
				}
			}
			if n := strings.Count(log.String(), "falling back to TCG"); n > 1 {
				t.Errorf("the fallback is reported %d times, want once", n)
			}
			if m, _ := filepath.Glob(filepath.Join(filepath.Dir(disk), ".nixvm-vm-initramfs-*")); len(m) != 0 {
				t.Errorf("initramfs left behind: %v", m)
			}
		})
	}
}

func copyRange(t *testing.T, src, dst string, off, n int64) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, io.NewSectionReader(in, off, n)); err != nil {
		t.Fatal(err)
	}
}

// TestStageCancel: cancelling the build kills the guest at once.
func TestStageCancel(t *testing.T) {
	bb := testutil.NeedTool(t, "busybox")[0]
	mods := t.TempDir()
	os.MkdirAll(filepath.Join(mods, "k"), 0o755)
	var dep strings.Builder
	for _, n := range []string{"virtio_pci", "virtio_blk", "ext4"} {
		os.WriteFile(filepath.Join(mods, "k", n+".ko"), []byte(n), 0o644)
		dep.WriteString("k/" + n + ".ko:\n")
	}
	os.WriteFile(filepath.Join(mods, "modules.dep"), []byte(dep.String()), 0o644)
	kernel := filepath.Join(t.TempDir(), "bzImage")
	os.WriteFile(kernel, []byte("kernel"), 0o644)
	disk, plan := testDisk(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(500*time.Millisecond, cancel)
	start := time.Now()
	_, err := Stage(ctx, Options{Kernel: kernel, Modules: mods, Init: bb, QEMU: fakeQEMU(t, "hang"), Accel: AccelTCG, Timeout: time.Minute}, disk, plan)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("cancel took %s", d)
	}
}

// TestModulesCompressed resolves modules from a made-up modules.dep whose
// files are .ko.zst and .ko.xz, as other distributions ship them.
func TestModulesCompressed(t *testing.T) {
	testutil.NeedTool(t, "xz", "zstd")
	dir := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(dir, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("kernel/a/base.ko", "\x7fELF base")
	write("kernel/b/mid-dep.ko", "\x7fELF mid")
	write("kernel/c/top.ko", "\x7fELF top")
	for _, argv := range [][]string{{"zstd", "-q", "--rm", "kernel/b/mid-dep.ko"}, {"xz", "-q", "kernel/c/top.ko"}} {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", argv, err, out)
		}
	}
	write("modules.dep", "kernel/c/top.ko.xz: kernel/b/mid-dep.ko.zst kernel/a/base.ko\nkernel/b/mid-dep.ko.zst: kernel/a/base.ko\nkernel/a/base.ko:\n")
	write("modules.builtin", "kernel/x/builtin_one.ko\n")
	mods, err := Modules(dir, []string{"top", "builtin-one"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range mods {
		got = append(got, m.Name+"="+string(m.Data))
	}
	want := []string{"base.ko=\x7fELF base", "mid_dep.ko=\x7fELF mid", "top.ko=\x7fELF top"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}
