package provision

import (
	"encoding/json"
	"encoding/xml"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// There is no nixpkgs on the test machines, so CI checks the Nix files in
// two ways: every .nix file in the repository parses (nix-instantiate
// --parse), and nix/host.nix, nix/package.nix and flake.nix are evaluated
// against the stubs in testdata/nix-stubs, after which the generated unit
// scripts run against a fake virsh.

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

type nixEval struct {
	Units map[string]struct {
		WantedBy      []string       `json:"wantedBy"`
		After         []string       `json:"after"`
		Requires      []string       `json:"requires"`
		Path          []string       `json:"path"`
		ServiceConfig map[string]any `json:"serviceConfig"`
	} `json:"units"`
	Timers         map[string]map[string]any `json:"timers"`
	Tmpfiles       []string                  `json:"tmpfiles"`
	Libvirtd       bool                      `json:"libvirtd"`
	SystemPackages []string                  `json:"systemPackages"`
	Orphans        string                    `json:"orphans"`
	Package        struct {
		Pname       string   `json:"pname"`
		SubPackages []string `json:"subPackages"`
		VendorHash  string   `json:"vendorHash"`
		Cgo         string   `json:"cgo"`
	} `json:"package"`
	Flake struct {
		Packages     []string `json:"packages"`
		NixosModules []string `json:"nixosModules"`
		HostImports  []string `json:"hostImports"`
		GuestImports []string `json:"guestImports"`
		HostPackage  string   `json:"hostPackage"`
		GuestPackage string   `json:"guestPackage"`
	} `json:"flake"`
}

type domainXML struct {
	Name   string  `xml:"name"`
	UUID   *string `xml:"uuid"`
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

func TestNixHostModule(t *testing.T) {
	testutil.NeedRoot(t) // --read-write-mode: the stubs write the unit scripts to /nix/store
	ni := testutil.NeedTool(t, "nix-instantiate")[0]
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
			if strings.Join(u.Path, " ") != "libvirt qemu coreutils gnused lvm2" {
				t.Errorf("%s: path %v", g, u.Path)
			}
		}
		if got := ev.Units["nixvm-guest-web1"].ServiceConfig["TimeoutStopSec"]; got != float64(32) {
			t.Errorf("web1 TimeoutStopSec: got %v, want shutdownTimeout 2 + 30", got)
		}
		gc := ev.Units["nixvm-image-gc"].ServiceConfig["ExecStart"]
		if want := stub + "/bin/nixvm-image 'gc' '--keep' '2' '--domains' '--scan' '/var/lib/libvirt/images' '--scan' '/etc/virt/base-images' '--pool' 'guests'"; gc != want {
			t.Errorf("gc: got %v, want %s", gc, want)
		}
		if ev.Timers["nixvm-image-gc"]["timerConfig"].(map[string]any)["OnCalendar"] != "weekly" {
			t.Errorf("gc timer: %v", ev.Timers)
		}
		if !ev.Libvirtd || len(ev.Tmpfiles) != 3 || !strings.Contains(ev.Tmpfiles[1], "/var/lib/nixvm-image/images") {
			t.Errorf("libvirtd %v, tmpfiles %v", ev.Libvirtd, ev.Tmpfiles)
		}
		p := ev.Package
		if p.Pname != "nixvm-image" || strings.Join(p.SubPackages, " ") != "cmd/nixvm-image cmd/nixvm-resize" || p.Cgo != "0" || !strings.HasPrefix(p.VendorHash, "sha256-") {
			t.Errorf("package: %+v", p)
		}
		f := ev.Flake
		if strings.Join(f.Packages, " ") != "default nixvm-image" || strings.Join(f.NixosModules, " ") != "default guest host" ||
			!strings.HasSuffix(f.HostImports[0], "/nix/host.nix") || !strings.HasSuffix(f.GuestImports[0], "/nix/guest.nix") ||
			f.HostPackage != "nixvm-image" || f.GuestPackage != "nixvm-image" {
			t.Errorf("flake: %+v", f)
		}
	})

	state := t.TempDir()
	script := func(t *testing.T, unit, key string, timeout time.Duration) (string, error) {
		t.Helper()
		p, _ := ev.Units[unit].ServiceConfig[key].(string)
		cmd := exec.Command("bash", p)
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
		if d.Disks[0].Type != "file" || d.Disks[0].Driver.Type != "qcow2" || d.Disks[0].Source.File != "/var/lib/libvirt/images/ci1.qcow2" {
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
		cmd := exec.Command("bash", filepath.Join(ev.Orphans, "bin", "nixvm-orphans"))
		if fi, err := os.Stat(ev.Orphans); err == nil && !fi.IsDir() {
			cmd = exec.Command("bash", ev.Orphans)
		}
		cmd.Env = append(os.Environ(), "FAKE_VIRSH_DIR="+state)
		out, err := cmd.CombinedOutput()
		if err != nil || string(out) != "old-guest\tshut off\n" {
			t.Errorf("got %v %q, want only old-guest", err, out)
		}
	})
}
