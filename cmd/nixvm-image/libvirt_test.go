package main

// A boot under a real libvirtd: the host module's domain XML (from the
// nix-stubs evaluation of nix/host.nix, domain type qemu), started by
// Debian's libvirtd in session mode as nobody (only the QEMU driver; no
// /dev/kvm, so TCG), with the firmware the XML asks for: SeaBIOS, or OVMF
// through libvirt's firmware autoselection.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// libvirtSession starts libvirtd (qemu:///session) as nobody in a fresh
// directory and returns that directory (readable by nobody) and a virsh
// runner connected to it.
func libvirtSession(t *testing.T) (string, func(args ...string) (string, error)) {
	t.Helper()
	tools := testutil.NeedTool(t, "libvirtd", "virsh")
	var qemuDriver string
	for _, d := range []string{"/usr/lib/x86_64-linux-gnu/libvirt/connection-driver", "/usr/lib64/libvirt/connection-driver", "/usr/lib/libvirt/connection-driver"} {
		if p := filepath.Join(d, "libvirt_driver_qemu.so"); exists(p) {
			qemuDriver = p
		}
	}
	if qemuDriver == "" {
		testutil.Skip(t, "libvirt's QEMU driver (libvirt_driver_qemu.so) not found: install libvirt-daemon-driver-qemu")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		testutil.Skip(t, "no user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	// Unix socket paths are limited to 108 bytes and libvirt makes long ones
	// (XDG_CONFIG_HOME/libvirt/qemu/channel/target/domain-…/org.qemu.guest_agent.0):
	// the directory is in /tmp itself, whatever TMPDIR says, and removed.
	dir, err := os.MkdirTemp("/tmp", "lv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.Mkdir(filepath.Join(dir, "drv"), 0o755)
	if err := os.Symlink(qemuDriver, filepath.Join(dir, "drv", filepath.Base(qemuDriver))); err != nil {
		t.Fatal(err)
	}
	// Short: libvirt puts unix sockets under XDG_CONFIG_HOME too.
	for _, d := range []string{"home", "run", "c"} {
		os.Mkdir(filepath.Join(dir, d), 0o700)
		os.Chown(filepath.Join(dir, d), uid, gid)
	}
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + filepath.Join(dir, "home"), "XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"),
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "c"), "XDG_CACHE_HOME=" + filepath.Join(dir, "home", ".cache"),
		"LIBVIRT_DRIVER_DIR=" + filepath.Join(dir, "drv")}
	asNobody := func(cmd *exec.Cmd) *exec.Cmd {
		cmd.Env = env
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, Setpgid: true}
		return cmd
	}
	daemon := asNobody(exec.Command(tools[0]))
	logf, _ := os.Create(filepath.Join(dir, "libvirtd.log"))
	daemon.Stdout, daemon.Stderr = logf, logf
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-daemon.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { daemon.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-daemon.Process.Pid, syscall.SIGKILL)
			<-done
		}
		logf.Close()
	})
	virsh := func(args ...string) (string, error) {
		cmd := asNobody(exec.Command(tools[1], append([]string{"-c", "qemu:///session"}, args...)...))
		out, err := cmd.CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	var lastErr error
	for range 100 {
		if _, lastErr = virsh("version"); lastErr == nil {
			return dir, virsh
		}
		time.Sleep(100 * time.Millisecond)
	}
	log, _ := os.ReadFile(filepath.Join(dir, "libvirtd.log"))
	t.Fatalf("libvirtd did not come up: %v\nlog:\n%s", lastErr, log)
	return "", nil
}

// hostModuleDomainXML evaluates nix/host.nix against testdata/nix-stubs and
// returns the domain XML it writes for the guest m-overlay-network-FIRMWARE
// with domain type qemu.
func hostModuleDomainXML(t *testing.T, firmware string) string {
	t.Helper()
	ni := testutil.NeedTool(t, "nix-instantiate")[0]
	stub := t.TempDir()
	os.Mkdir(filepath.Join(stub, "bin"), 0o755)
	out, err := exec.Command(ni, "--eval", "--strict", "--json", "--read-write-mode", "../../testdata/nix-stubs/eval.nix",
		"--argstr", "stubBin", stub, "-A", "matrix.qemu").Output()
	if err != nil {
		t.Fatalf("evaluating the host module: %v", err)
	}
	var m map[string]string
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(m["nixvm-guest-m-overlay-network-"+firmware])
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// bootUnderLibvirt boots img (qcow2) as the host module's guest with the
// given firmware under a session libvirtd, until the guest powers off, and
// returns its serial output and the domain XML libvirt completed. The XML
// is the module's with what this machine needs instead of a host's setup:
// the disk an overlay here, no network interface (a session libvirtd has
// none of the module's kinds), the serial console in a file.
func bootUnderLibvirt(t *testing.T, img, firmware string) (serial, live string) {
	t.Helper()
	dir, virsh := libvirtSession(t)
	name := "m-overlay-network-" + firmware
	base := filepath.Join(dir, "base.qcow2")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(base, b, 0o644)
	disk := filepath.Join(dir, "home", "disk.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk)
	home, _ := os.Stat(filepath.Join(dir, "home"))
	st := home.Sys().(*syscall.Stat_t)
	os.Chown(disk, int(st.Uid), int(st.Gid))
	log := filepath.Join(dir, "home", "serial.log")

	xml := hostModuleDomainXML(t, firmware)
	xml = strings.ReplaceAll(xml, "@UUID@", "0f3c5b8e-0000-4000-8000-00000000000"+map[string]string{"bios": "1", "efi": "2"}[firmware])
	xml = strings.ReplaceAll(xml, "/var/lib/libvirt/images/"+name+".qcow2", disk)
	xml = regexp.MustCompile(`(?s)<interface .*?</interface>`).ReplaceAllString(xml, "")
	xml = strings.ReplaceAll(xml, `<serial type="pty"/>`, `<serial type="file"><source path="`+log+`"/></serial>`)
	xmlFile := filepath.Join(dir, "domain.xml")
	os.WriteFile(xmlFile, []byte(xml), 0o644)
	for _, args := range [][]string{{"define", xmlFile}, {"start", name}} {
		if _, err := virsh(args...); err != nil {
			t.Fatal(err)
		}
	}
	live, _ = virsh("dumpxml", name)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		state, _ := virsh("domstate", name)
		if strings.TrimSpace(state) == "shut off" {
			break
		}
		if time.Now().After(deadline) {
			virsh("destroy", name)
			break
		}
		time.Sleep(time.Second)
	}
	out, _ := os.ReadFile(log)
	virsh("undefine", "--nvram", name)
	return strings.ReplaceAll(string(out), "\r", ""), live
}

// checkLibvirtBoots boots img under libvirt with SeaBIOS and with OVMF.
func checkLibvirtBoots(t *testing.T, img string) {
	for _, fw := range []string{"bios", "efi"} {
		serial, live := bootUnderLibvirt(t, img, fw)
		if len(vmtest.Markers(serial, "fake-nixos done")) != 1 {
			t.Errorf("under libvirt with the host module's %s domain, the image did not boot its system; libvirt's XML:\n%s\nserial output (tail):\n%s", fw, live, tail(serial, 3000))
			continue
		}
		if loader := regexp.MustCompile(`<loader[^>]*>[^<]*</loader>`).FindString(live); (fw == "efi") != strings.Contains(loader, "OVMF") {
			t.Errorf("%s domain: libvirt's loader %q", fw, loader)
		}
		t.Logf("booted under libvirt (%s)", fw)
	}
}
