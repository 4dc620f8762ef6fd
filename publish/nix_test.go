package publish

import (
	"encoding/json"
	"os/exec"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestNixPullTimers evaluates nix/pull.nix (services.nixvm.images) against
// the stubs in testdata/nix-stubs: one oneshot pull unit and one timer per
// image, with the options turned into pull's flags.
func TestNixPullTimers(t *testing.T) {
	ni := testutil.NeedTool(t, "nix-instantiate")[0]
	out, err := exec.Command(ni, "--eval", "--strict", "--json", "../testdata/nix-stubs/eval-pull.nix").Output()
	if err != nil {
		t.Fatalf("nix-instantiate: %v", err)
	}
	var ev struct {
		Units map[string]struct {
			After         []string          `json:"after"`
			ServiceConfig map[string]string `json:"serviceConfig"`
		} `json:"units"`
		Timers map[string]struct {
			WantedBy    []string          `json:"wantedBy"`
			TimerConfig map[string]string `json:"timerConfig"`
		} `json:"timers"`
	}
	if err := json.Unmarshal(out, &ev); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"nixvm-image-pull-baseline": "/nixvm/bin/nixvm-image 'pull' 's3://images/nixvm' '--name' 'baseline' '--store-dir' '/var/lib/nixvm-image/images' '--link=/etc/virt/base-images/baseline.qcow2' '--endpoint=http://minio.lan:9000'",
		"nixvm-image-pull-web":      "/nixvm/bin/nixvm-image 'pull' 'https://cache.example/nixvm' '--name' 'web' '--store-dir' '/var/lib/nixvm-image/images' '--trust' 'nixvm-image ed25519 public AAAA'",
	}
	if len(ev.Units) != 2 || len(ev.Timers) != 2 {
		t.Fatalf("units %v, timers %v", ev.Units, ev.Timers)
	}
	for unit, cmd := range want {
		u := ev.Units[unit]
		if u.ServiceConfig["ExecStart"] != cmd || u.ServiceConfig["Type"] != "oneshot" {
			t.Errorf("%s: %v, want ExecStart %s", unit, u.ServiceConfig, cmd)
		}
		tm := ev.Timers[unit]
		if tm.TimerConfig["OnUnitActiveSec"] != "15min" || len(tm.WantedBy) != 1 || tm.WantedBy[0] != "timers.target" {
			t.Errorf("%s timer: %+v", unit, tm)
		}
	}
	if ev.Units["nixvm-image-pull-baseline"].ServiceConfig["EnvironmentFile"] != "/etc/nixvm/s3.env" {
		t.Errorf("no EnvironmentFile: %v", ev.Units["nixvm-image-pull-baseline"].ServiceConfig)
	}
}
