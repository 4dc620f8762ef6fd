package nix

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestGoDirective: go.mod asks for no more than the first release of its
// language version (go 1.26.0, not 1.26.8): buildGoModule builds with
// GOTOOLCHAIN=local, and nixpkgs' Go 1.26.0 refuses a module that asks for
// 1.26.8. (A bare "go 1.26" is below dependencies that declare 1.26.0, which
// the toolchain refuses.) Nothing the binaries build from may need more.
func TestGoDirective(t *testing.T) {
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if m == nil || !regexp.MustCompile(`^1\.\d+(\.0)?$`).Match(m[1]) {
		t.Fatalf("go.mod: go directive %q, want the first release of a language version, such as 1.26.0", m)
	}
	if regexp.MustCompile(`(?m)^toolchain `).Match(mod) {
		t.Error("go.mod has a toolchain line, which GOTOOLCHAIN=local builds refuse when it is newer than their Go")
	}
	floor := strings.TrimSuffix(string(m[1]), ".0") + ".0"
	goTool := testutil.NeedTool(t, "go")[0]
	cmd := exec.Command(goTool, "list", "-deps", "-f", "{{with .Module}}{{.Path}} {{.GoVersion}}{{end}}", "../cmd/...")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, v, _ := strings.Cut(l, " ")
		if v != "" && compareGo(v, floor) > 0 {
			t.Errorf("%s needs Go %s, more than go.mod's %s", path, v, floor)
		}
	}
}

// compareGo compares Go versions such as 1.26, 1.26.0 and 1.21.3.
func compareGo(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < max(len(as), len(bs)); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

func TestCompareGo(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{{"1.26", "1.26.0", 0}, {"1.26.8", "1.26.0", 1}, {"1.21", "1.26.0", -1}, {"1.26.0", "1.26.1", -1}} {
		if got := compareGo(tc.a, tc.b); got != tc.want {
			t.Errorf("compareGo(%s, %s) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// TestVendorHash recomputes nix/source.nix's vendorHash the way
// buildGoModule makes it: `go mod vendor`, then the NAR hash of the
// directory.
func TestVendorHash(t *testing.T) {
	tools := testutil.NeedTool(t, "go", "nix")
	src, err := os.ReadFile("source.nix")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`vendorHash = "(sha256-[A-Za-z0-9+/=]+)";`).FindSubmatch(src)
	if m == nil {
		t.Fatal("no vendorHash in source.nix")
	}
	dir := filepath.Join(t.TempDir(), "vendor")
	cmd := exec.Command(tools[0], "mod", "vendor", "-o", dir)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "GOFLAGS=", "GOPROXY=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	out, err := exec.Command(tools[1], "--extra-experimental-features", "nix-command", "hash", "path", dir).Output()
	if err != nil {
		t.Fatalf("nix hash path: %v", err)
	}
	if got := strings.TrimSpace(string(out)); got != string(m[1]) {
		t.Errorf("vendorHash: source.nix has %s, go.mod/go.sum give %s; put the new one in nix/source.nix", m[1], got)
	}
}
