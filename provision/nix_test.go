package provision

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// There is no nixpkgs on the test machines, so CI checks the Nix files in
// two ways: every .nix file in the repository parses (nix-instantiate
// --parse), and nix/host.nix, nix/package.nix, nix/resize.nix and flake.nix
// are evaluated against the stubs in testdata/nix-stubs: the unit scripts
// are built as writeShellApplication builds them (shellcheck), run against
// a fake virsh, and every domain XML the host module can write passes
// virt-xml-validate. (The guest module is tested through the CLI, in
// cmd/nixvm-image; flake.nix's checks run the same against real nixpkgs.)

func TestNixParse(t *testing.T) {
	ni := testutil.NeedTool(t, "nix-instantiate")[0]
	var files []string
	filepath.WalkDir("..", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin" || d.Name() == "demo" || d.Name() == "bench-out") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".nix") {
			files = append(files, p)
		}
		return nil
	})
	for _, want := range []string{"../flake.nix", "../nix/host.nix", "../nix/package.nix", "../nix/guest.nix"} {
		found := false
		for _, f := range files {
			found = found || f == want
		}
		if !found {
			t.Errorf("%s not found", want)
		}
	}
	for _, f := range files {
		if out, err := exec.Command(ni, "--parse", f).CombinedOutput(); err != nil {
			t.Errorf("nix-instantiate --parse %s: %v\n%s", f, err, out)
		}
	}
}

// fakeVirshScript keeps one domain's state in files in $FAKE_VIRSH_DIR and
// logs each call. shutdown is obeyed only when the file "obey" exists (a
// guest that handles ACPI); event waits briefly, then applies a pending
// shutdown or, with "stop-on-event", a shutdown from inside the guest.
const fakeVirshScript = `#!/bin/sh
D=$FAKE_VIRSH_DIR
echo "$*" >> $D/log
cmd=$1
for a; do last=$a; done
case $cmd in
domuuid) [ -f $D/uuid ] && cat $D/uuid || { echo "error: failed to get domain '$last'" >&2; exit 1; } ;;
define) cp "$last" $D/defined.xml; [ -f $D/uuid ] || echo 11111111-2222-3333-4444-555555555555 > $D/uuid; [ -f $D/state ] || echo "shut off" > $D/state ;;
domstate) [ -f $D/state ] && cat $D/state || { echo "error: failed to get domain" >&2; exit 1; } ;;
start) echo running > $D/state ;;
shutdown) [ -f $D/obey ] && touch $D/shutting ;;
destroy) echo "shut off" > $D/state ;;
event) sleep 0.2; if [ -f $D/shutting ] || [ -f $D/stop-on-event ]; then echo "shut off" > $D/state; fi ;;
list) cat $D/list ;;
dumpxml) cat $D/dumpxml-$last 2>/dev/null || exit 1 ;;
*) echo "fake virsh: unknown $cmd" >&2; exit 1 ;;
esac
`

type nixPackage struct {
	Pname             string   `json:"pname"`
	Version           string   `json:"version"`
	SubPackages       []string `json:"subPackages"`
	VendorHash        string   `json:"vendorHash"`
	Ldflags           []string `json:"ldflags"`
	System            string   `json:"system"`
	Cgo               string   `json:"cgo"`
	License           string   `json:"license"`
	MainProgram       string   `json:"mainProgram"`
	PostInstall       string   `json:"postInstall"`
	AllowedReferences []string `json:"allowedReferences"`
}

type nixEval struct {
	Stubs string `json:"stubs"`
	Units map[string]struct {
		WantedBy         []string       `json:"wantedBy"`
		After            []string       `json:"after"`
		Requires         []string       `json:"requires"`
		RestartIfChanged bool           `json:"restartIfChanged"`
		Path             []string       `json:"path"`
		ServiceConfig    map[string]any `json:"serviceConfig"`
		Drvs             []string       `json:"drvs"`
	} `json:"units"`
	Timers           map[string]map[string]any        `json:"timers"`
	Tmpfiles         []string                         `json:"tmpfiles"`
	Libvirtd         bool                             `json:"libvirtd"`
	SystemPackages   []string                         `json:"systemPackages"`
	Orphans          string                           `json:"orphans"`
	OrphansDrvs      []string                         `json:"orphansDrvs"`
	Assertions       []string                         `json:"assertions"`
	NoPathAssertions []string                         `json:"noPathAssertions"`
	BadNames         []string                         `json:"badNames"`
	GoodNames        []string                         `json:"goodNames"`
	Matrix           map[string]map[string]string     `json:"matrix"`
	Packages         map[string]map[string]nixPackage `json:"packages"`
	Flake            struct {
		Systems      []string              `json:"systems"`
		NixosModules []string              `json:"nixosModules"`
		Checks       map[string][]string   `json:"checks"`
		Formatter    map[string]string     `json:"formatter"`
		Overlay      map[string]nixPackage `json:"overlay"`
		Modules      map[string]struct {
			HostImports  []string   `json:"hostImports"`
			GuestImports []string   `json:"guestImports"`
			HostPackage  nixPackage `json:"hostPackage"`
			GuestPackage nixPackage `json:"guestPackage"`
		} `json:"modules"`
	} `json:"flake"`
}

type domainXML struct {
	Name string  `xml:"name"`
	UUID *string `xml:"uuid"`
	OS   struct {
		Firmware string `xml:"firmware,attr"`
		Features []struct {
			Name    string `xml:"name,attr"`
			Enabled string `xml:"enabled,attr"`
		} `xml:"firmware>feature"`
	} `xml:"os"`
	Memory struct {
		Unit  string `xml:"unit,attr"`
		Value string `xml:",chardata"`
	} `xml:"memory"`
	Disks []struct {
		Type   string `xml:"type,attr"`
		Driver struct {
			Type string `xml:"type,attr"`
		} `xml:"driver"`
		Source struct {
			Pool   string `xml:"pool,attr"`
			Volume string `xml:"volume,attr"`
			Dev    string `xml:"dev,attr"`
			File   string `xml:"file,attr"`
		} `xml:"source"`
	} `xml:"devices>disk"`
	Interface struct {
		Type string `xml:"type,attr"`
		Mac  struct {
			Address string `xml:"address,attr"`
		} `xml:"mac"`
	} `xml:"devices>interface"`
}

// execPath reads the program of a systemd Exec* line that
// utils.escapeSystemdExecArgs wrote: a JSON string, % and $ doubled.
func execPath(t *testing.T, line any) string {
	t.Helper()
	s, _ := line.(string)
	word, _, _ := strings.Cut(s, " ")
	var p string
	if err := json.Unmarshal([]byte(strings.NewReplacer("%%", "%", "$$", "$").Replace(word)), &p); err != nil {
		t.Fatalf("Exec line %q is not escapeSystemdExecArgs' quoting: %v", s, err)
	}
	return p
}

func TestNixHostModule(t *testing.T) {
	testutil.NeedRoot(t) // --read-write-mode: the stubs write the unit scripts to /nix/store
	tools := testutil.NeedTool(t, "nix-instantiate", "nix-store", "shellcheck", "virt-xml-validate", "xmllint")
	ni, ns, validate := tools[0], tools[1], tools[3]
	stub := t.TempDir()
	os.MkdirAll(filepath.Join(stub, "bin"), 0o755)
	os.WriteFile(filepath.Join(stub, "bin", "virsh"), []byte(fakeVirshScript), 0o755)
	os.WriteFile(filepath.Join(stub, "bin", "nixvm-image"), []byte("#!/bin/sh\necho \"$*\" >> $FAKE_VIRSH_DIR/nixvm-image.log\n"), 0o755)
	out, err := exec.Command(ni, "--eval", "--strict", "--json", "--read-write-mode", "../testdata/nix-stubs/eval.nix", "--argstr", "stubBin", stub).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("nix-instantiate --eval: %v\n%s", err, stderr)
	}
	var ev nixEval
	if err := json.Unmarshal(out, &ev); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	stubStore := ev.Stubs
	// Build the scripts (writeShellApplication: shellcheck runs on each).
	drvs := append([]string{}, ev.OrphansDrvs...)
	for _, u := range ev.Units {
		drvs = append(drvs, u.Drvs...)
	}
	realise := exec.Command(ns, append([]string{"--realise", "--option", "substituters", "", "--option", "sandbox", "false", "--quiet"}, drvs...)...)
	if out, err := realise.CombinedOutput(); err != nil {
		t.Fatalf("building the unit scripts (shellcheck): %v\n%s", err, out)
	}

	t.Run("definitions", func(t *testing.T) {
		for _, g := range []string{"some-athens-guest", "web1", "ci1"} {
			u, ok := ev.Units["nixvm-guest-"+g]
			if !ok {
				t.Fatalf("no unit for %s: %v", g, ev.Units)
			}
			if u.ServiceConfig["Type"] != "simple" || u.Requires[0] != "libvirtd.service" {
				t.Errorf("%s: got %v, requires %v; want Type simple requiring libvirtd", g, u.ServiceConfig, u.Requires)
			}
			if want := g != "ci1"; (len(u.WantedBy) == 1) != want {
				t.Errorf("%s: wantedBy %v, want autostart %v", g, u.WantedBy, want)
			}
			// A rebuild restarts no guest unless the guest asks for it (ci1).
			if u.RestartIfChanged != (g == "ci1") {
				t.Errorf("%s: restartIfChanged %v", g, u.RestartIfChanged)
			}
			if strings.Join(u.After, " ") != "libvirtd.service libvirt-guests.service network.target" {
				t.Errorf("%s: after %v, want libvirtd and libvirt-guests first", g, u.After)
			}
			if len(u.Path) != 0 {
				t.Errorf("%s: path %v; the scripts carry their own (runtimeInputs)", g, u.Path)
			}
			for _, k := range []string{"NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"} {
				if u.ServiceConfig[k] != true {
					t.Errorf("%s: %s = %v, want true", g, k, u.ServiceConfig[k])
				}
			}
			for _, k := range []string{"ExecStartPre", "ExecStart", "ExecStop"} {
				if p := execPath(t, u.ServiceConfig[k]); !strings.HasPrefix(p, "/nix/store/") || !strings.Contains(p, "/bin/nixvm-guest-"+g+"-") {
					t.Errorf("%s: %s %q", g, k, p)
				}
			}
		}
		if got := ev.Units["nixvm-guest-web1"].ServiceConfig["TimeoutStopSec"]; got != float64(32) {
			t.Errorf("web1 TimeoutStopSec: got %v, want shutdownTimeout 2 + 30", got)
		}
		gc := ev.Units["nixvm-image-gc"].ServiceConfig
		if want := `"` + stubStore + `/bin/nixvm-image" "gc" "--keep" "2" "--domains" "--scan" "/var/lib/libvirt/images" "--scan" "/etc/virt/base-images" "--pool" "guests"`; gc["ExecStart"] != want {
			t.Errorf("gc: got %v, want %s", gc["ExecStart"], want)
		}
		if gc["ProtectSystem"] != "strict" || fmt.Sprint(gc["ReadWritePaths"]) != "[/var/lib/nixvm-image]" || gc["PrivateNetwork"] != true {
			t.Errorf("gc hardening: %v", gc)
		}
		// Issue 12 item 10: gc opens no character device and writes no
		// block device, runs with one capability and no new privileges.
		for k, want := range map[string]string{
			"DevicePolicy": "closed", "DeviceAllow": "[block-* r]", "CapabilityBoundingSet": "[CAP_DAC_READ_SEARCH]",
			"AmbientCapabilities": "[]", "RestrictAddressFamilies": "[AF_UNIX]", "NoNewPrivileges": "true",
			"ProtectKernelTunables": "true", "ProtectKernelModules": "true", "ProtectKernelLogs": "true",
			"ProtectControlGroups": "true", "ProtectClock": "true", "ProtectHostname": "true", "ProtectHome": "true",
			"ProtectProc": "invisible", "RestrictNamespaces": "true", "RestrictSUIDSGID": "true",
			"MemoryDenyWriteExecute": "true", "SystemCallArchitectures": "native", "UMask": "0077",
			"SystemCallFilter": "[@system-service]", "SystemCallErrorNumber": "EPERM",
		} {
			if got := fmt.Sprint(gc[k]); got != want {
				t.Errorf("gc unit: %s = %s, want %s", k, got, want)
			}
		}
		if ev.Timers["nixvm-image-gc"]["timerConfig"].(map[string]any)["OnCalendar"] != "weekly" {
			t.Errorf("gc timer: %v", ev.Timers)
		}
		if !ev.Libvirtd || len(ev.Tmpfiles) != 3 || !strings.Contains(ev.Tmpfiles[1], "/var/lib/nixvm-image/images") {
			t.Errorf("libvirtd %v, tmpfiles %v", ev.Libvirtd, ev.Tmpfiles)
		}
		if len(ev.Assertions) != 0 {
			t.Errorf("failed assertions: %v", ev.Assertions)
		}
		if len(ev.NoPathAssertions) != 1 || !strings.Contains(ev.NoPathAssertions[0], `disk.type = "device" needs disk.path`) {
			t.Errorf("a device guest without a path: assertions %q", ev.NoPathAssertions)
		}
		if len(ev.BadNames) != 7 || len(ev.GoodNames) != 4 {
			t.Errorf("guest names: rejected %q (want all 7 bad ones), accepted %q (want all 4 good ones)", ev.BadNames, ev.GoodNames)
		}
	})

	t.Run("package and flake", func(t *testing.T) {
		f := ev.Flake
		if strings.Join(f.Systems, " ") != "aarch64-linux x86_64-linux" || strings.Join(f.NixosModules, " ") != "default guest host" {
			t.Errorf("flake: systems %v, modules %v", f.Systems, f.NixosModules)
		}
		for _, sys := range []string{"aarch64-linux", "x86_64-linux"} {
			ps := ev.Packages[sys]
			img, rs := ps["nixvm-image"], ps["nixvm-resize"]
			if ps["default"].Pname != "nixvm-image" || img.System != sys || rs.System != sys {
				t.Errorf("%s: packages %+v", sys, ps)
			}
			if strings.Join(img.SubPackages, " ") != "cmd/nixvm-image cmd/nixvm-resize" || strings.Join(rs.SubPackages, " ") != "cmd/nixvm-resize" {
				t.Errorf("%s: subPackages %v, %v", sys, img.SubPackages, rs.SubPackages)
			}
			for _, p := range []nixPackage{img, rs} {
				if p.Cgo != "0" || p.License != "MIT" || p.MainProgram != p.Pname || !strings.HasPrefix(p.VendorHash, "sha256-") ||
					!slicesContain(p.Ldflags, "-X github.com/nixvm-image/nixvm-image/internal/version.Version="+p.Version) {
					t.Errorf("%s %s: %+v", sys, p.Pname, p)
				}
			}
			if !strings.Contains(img.PostInstall, "--prefix PATH : /stub/qemu_kvm/bin:/stub/xz/bin") || !strings.Contains(img.PostInstall, "--suffix PATH : /stub/openssh/bin:/stub/lvm2/bin") {
				t.Errorf("%s: the wrapper: %q", sys, img.PostInstall)
			}
			if rs.AllowedReferences == nil || len(rs.AllowedReferences) != 0 {
				t.Errorf("%s: nixvm-resize allowedReferences %v, want []", sys, rs.AllowedReferences)
			}
			// The modules build the packages for the host's own system.
			m := f.Modules[sys]
			if !strings.HasSuffix(m.HostImports[0], "/nix/host.nix") || !strings.HasSuffix(m.GuestImports[0], "/nix/guest.nix") ||
				m.HostPackage.Pname != "nixvm-image" || m.HostPackage.System != sys || m.GuestPackage.Pname != "nixvm-resize" || m.GuestPackage.System != sys {
				t.Errorf("%s: modules %+v", sys, m)
			}
			if strings.Join(f.Checks[sys], " ") != "guest-module host-module nixvm-image nixvm-resize" || f.Formatter[sys] == "" {
				t.Errorf("%s: checks %v, formatter %q", sys, f.Checks[sys], f.Formatter[sys])
			}
		}
		if f.Overlay["nixvm-image"].Pname != "nixvm-image" || f.Overlay["nixvm-resize"].Pname != "nixvm-resize" || len(f.Overlay) != 2 {
			t.Errorf("overlay: %+v", f.Overlay)
		}
	})

	// Every domain XML the module can write (each disk, network and
	// firmware kind, kvm and qemu) passes libvirt's schema, with a UUID and
	// without one, as the start script defines it.
	t.Run("domain XML validates", func(t *testing.T) {
		n := 0
		for domainType, m := range ev.Matrix {
			for unit, xmlPath := range m {
				guest := strings.TrimPrefix(unit, "nixvm-guest-")
				src, err := os.ReadFile(xmlPath)
				if err != nil {
					t.Fatal(err)
				}
				for _, variant := range []string{
					strings.ReplaceAll(string(src), "@UUID@", "0f3c5b8e-0000-4000-8000-000000000001"),
					regexp.MustCompile(`(?m)^.*@UUID@.*\n`).ReplaceAllString(string(src), ""),
				} {
					f := filepath.Join(t.TempDir(), guest+".xml")
					os.WriteFile(f, []byte(variant), 0o644)
					if out, err := exec.Command(validate, f, "domain").CombinedOutput(); err != nil {
						t.Errorf("%s (%s): virt-xml-validate: %v\n%s\n%s", guest, domainType, err, out, variant)
					}
					n++
				}
				var d domainXML
				if err := xml.Unmarshal(src, &d); err != nil {
					t.Fatal(err)
				}
				if efi := strings.HasSuffix(guest, "-efi"); efi != (d.OS.Firmware == "efi") || efi && (len(d.OS.Features) != 1 || d.OS.Features[0].Name != "secure-boot" || d.OS.Features[0].Enabled != "no") {
					t.Errorf("%s: os %+v", guest, d.OS)
				}
			}
		}
		if n != 2*24*2 {
			t.Errorf("validated %d domain XMLs, want 96", n)
		}
	})

	state := t.TempDir()
	script := func(t *testing.T, unit, key string, timeout time.Duration) (string, error) {
		t.Helper()
		cmd := exec.Command(execPath(t, ev.Units[unit].ServiceConfig[key]))
		cmd.Env = append(os.Environ(), "FAKE_VIRSH_DIR="+state)
		done := make(chan struct{})
		var out []byte
		var err error
		go func() { out, err = cmd.CombinedOutput(); close(done) }()
		select {
		case <-done:
		case <-time.After(timeout):
			cmd.Process.Kill()
			<-done
			t.Fatalf("%s %s did not finish in %s: %s", unit, key, timeout, out)
		}
		return string(out), err
	}
	reset := func(files map[string]string) {
		ents, _ := os.ReadDir(state)
		for _, e := range ents {
			os.Remove(filepath.Join(state, e.Name()))
		}
		for n, c := range files {
			os.WriteFile(filepath.Join(state, n), []byte(c), 0o644)
		}
	}
	read := func(n string) string { b, _ := os.ReadFile(filepath.Join(state, n)); return string(b) }
	defined := func(t *testing.T) domainXML {
		var d domainXML
		if err := xml.Unmarshal([]byte(read("defined.xml")), &d); err != nil {
			t.Fatalf("defined XML: %v\n%s", err, read("defined.xml"))
		}
		return d
	}

	t.Run("start new", func(t *testing.T) {
		reset(nil)
		if out, err := script(t, "nixvm-guest-web1", "ExecStartPre", 10*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if got := read("nixvm-image.log"); got != "provision --quiet --image baseline --guest web1 --size 20G --pool guests --volume guest-web1\n" {
			t.Errorf("provision: got %q", got)
		}
		d := defined(t)
		if d.Name != "web1" || d.UUID != nil || d.Memory.Value != "2048" || d.Memory.Unit != "MiB" || len(d.Disks) != 1 ||
			d.Disks[0].Type != "volume" || d.Disks[0].Source.Pool != "guests" || d.Disks[0].Source.Volume != "guest-web1" ||
			d.Interface.Mac.Address != "52:54:00:00:00:01" || d.Interface.Type != "network" {
			t.Errorf("domain: %+v", d)
		}
		if read("state") != "running\n" {
			t.Errorf("not started: %s", read("log"))
		}
	})
	t.Run("start again keeps the UUID", func(t *testing.T) {
		reset(map[string]string{"uuid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n", "state": "shut off\n"})
		if out, err := script(t, "nixvm-guest-some-athens-guest", "ExecStartPre", 10*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		d := defined(t)
		if d.UUID == nil || *d.UUID != "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" {
			t.Errorf("uuid: got %v, want the existing one", d.UUID)
		}
		if d.Disks[0].Type != "block" || d.Disks[0].Source.Dev != "/dev/vg/guest-some-athens-guest" || d.Interface.Type != "direct" {
			t.Errorf("domain: %+v", d)
		}
		if !strings.Contains(read("nixvm-image.log"), "--target /dev/vg/guest-some-athens-guest") {
			t.Errorf("provision: %s", read("nixvm-image.log"))
		}
	})
	t.Run("overlay", func(t *testing.T) {
		reset(nil)
		if out, err := script(t, "nixvm-guest-ci1", "ExecStartPre", 10*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		d := defined(t)
		if d.Disks[0].Type != "file" || d.Disks[0].Driver.Type != "qcow2" || d.Disks[0].Source.File != "/var/lib/libvirt/images/ci1.qcow2" || d.OS.Firmware != "efi" {
			t.Errorf("domain: %+v", d)
		}
	})
	t.Run("waiter exits when the guest shuts itself down", func(t *testing.T) {
		reset(map[string]string{"state": "running\n", "stop-on-event": ""})
		out, err := script(t, "nixvm-guest-web1", "ExecStart", 10*time.Second)
		if err != nil || !strings.Contains(out, "shut off") {
			t.Errorf("got %v\n%s", err, out)
		}
	})
	t.Run("waiter fails when the domain crashed", func(t *testing.T) {
		reset(map[string]string{"state": "crashed\n"})
		if _, err := script(t, "nixvm-guest-web1", "ExecStart", 10*time.Second); err == nil {
			t.Error("exit 0 for a crashed domain")
		}
	})
	t.Run("stop gracefully", func(t *testing.T) {
		reset(map[string]string{"state": "running\n", "obey": ""})
		if out, err := script(t, "nixvm-guest-web1", "ExecStop", 10*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if read("state") != "shut off\n" || strings.Contains(read("log"), "destroy") {
			t.Errorf("state %q, log:\n%s", read("state"), read("log"))
		}
	})
	t.Run("stop destroys after the timeout", func(t *testing.T) {
		reset(map[string]string{"state": "running\n"})
		start := time.Now()
		out, err := script(t, "nixvm-guest-web1", "ExecStop", 15*time.Second)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if el := time.Since(start); el < time.Second /* date +%s: the deadline has 1 s resolution */ || !strings.Contains(read("log"), "shutdown web1") || !strings.Contains(read("log"), "destroy web1") {
			t.Errorf("after %s: log:\n%s", el, read("log"))
		}
	})
	t.Run("stop of a stopped domain", func(t *testing.T) {
		reset(map[string]string{"state": "shut off\n"})
		if out, err := script(t, "nixvm-guest-web1", "ExecStop", 5*time.Second); err != nil || strings.Contains(read("log"), "shutdown") {
			t.Errorf("%v\n%s\nlog:\n%s", err, out, read("log"))
		}
	})
	t.Run("orphans", func(t *testing.T) {
		reset(map[string]string{
			"state":             "shut off\n",
			"list":              "web1\nold-guest\nmanual-vm\n",
			"dumpxml-old-guest": "<domain><metadata><nixvm:guest xmlns:nixvm=\"https://github.com/nixvm-image/nixvm-image/host\"/></metadata></domain>",
			"dumpxml-manual-vm": "<domain/>",
			"dumpxml-web1":      "<domain><metadata><nixvm:guest xmlns:nixvm=\"https://github.com/nixvm-image/nixvm-image/host\"/></metadata></domain>",
		})
		cmd := exec.Command(ev.Orphans)
		cmd.Env = append(os.Environ(), "FAKE_VIRSH_DIR="+state)
		out, err := cmd.CombinedOutput()
		if err != nil || string(out) != "old-guest\tshut off\n" {
			t.Errorf("got %v %q, want only old-guest", err, out)
		}
	})
}

func slicesContain(s []string, v string) bool { return slices.Contains(s, v) }
