package main

// Table tests of the Nix command lines build runs for CONFIG.nix and
// --flake: pass-through flags, flake references, string and path escaping
// (checked against the real Nix parser), and --dry-run evaluating only.

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

const nixFeatures = "nix-command flakes"

func TestNixCommand(t *testing.T) {
	legacy := `({ lib, ... }: { nixvm.layout = lib.mkForce "legacy"; nixvm.resize.package = lib.mkOverride 1200 (builtins.path { name = "nixvm-resize"; path = /tmp/e/nixvm-resize; }); })`
	flakeExpr := func(ref, name, module string) string {
		return `let
  flake = builtins.getFlake "` + ref + `";
  configurations = flake.nixosConfigurations or { };
in
if !(configurations ? "` + name + `") then
  throw "nixvm-image: the flake ` + ref + ` has no nixosConfigurations.\"` + name + `\" (it has: ${toString (builtins.attrNames configurations)})"
else
  (configurations."` + name + `".extendModules { modules = [ /tmp/e/g.nix ` + module + ` ]; }).config.system.build.toplevel`
	}
	for _, tc := range []struct {
		name string
		req  nixRequest
		pt   []string
		want []string
	}{
		{"config", nixRequest{Config: "/etc/nixos/baseline.nix", Layout: partition.Legacy, Resize: "/tmp/e/nixvm-resize"}, nil,
			[]string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration",
				`{ imports = [ /etc/nixos/baseline.nix /tmp/e/g.nix ` + legacy + ` ]; }`, "--out-link", "/tmp/e/result"}},
		{"config without nixvm-resize, pass-through", nixRequest{Config: "/c.nix", Layout: partition.EFI},
			[]string{"-I", "nixpkgs=/src/np", "--argstr", "system", "aarch64-linux", "--show-trace", "--impure"},
			[]string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration",
				`{ imports = [ /c.nix /tmp/e/g.nix ({ lib, ... }: { nixvm.layout = lib.mkForce "efi"; }) ]; }`,
				"-I", "nixpkgs=/src/np", "--argstr", "system", "aarch64-linux", "--show-trace", "--impure", "--out-link", "/tmp/e/result"}},
		{"config path needing quotes", nixRequest{Config: "/my dir/\"q\"/$HOME/${x}/new\nline\\.nix", Layout: partition.Legacy}, nil,
			[]string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration",
				`{ imports = [ (/. + "/my dir/\"q\"/\$HOME/\${x}/new\nline\\.nix") /tmp/e/g.nix ({ lib, ... }: { nixvm.layout = lib.mkForce "legacy"; }) ]; }`,
				"--out-link", "/tmp/e/result"}},
		{"config, dry run", nixRequest{Config: "/c.nix", Layout: partition.Legacy, Eval: true}, []string{"--option", "substituters", ""},
			[]string{"nix-instantiate", "--eval", "--json", "<nixpkgs/nixos>", "-A", "system.outPath", "--arg", "configuration",
				`{ imports = [ /c.nix /tmp/e/g.nix ({ lib, ... }: { nixvm.layout = lib.mkForce "legacy"; }) ]; }`,
				"--option", "substituters", ""}},
		{"flake", nixRequest{Flake: flakeRef{"github:me/sys", "web"}, Layout: partition.Hybrid}, []string{"--show-trace"},
			[]string{"nix", "--extra-experimental-features", nixFeatures, "build", "--impure", "--expr",
				flakeExpr("github:me/sys", "web", `({ lib, ... }: { nixvm.layout = lib.mkForce "hybrid"; })`),
				"--show-trace", "--out-link", "/tmp/e/result"}},
		{"git flake in a subdirectory, name with a dot and a $", nixRequest{Flake: flakeRef{"git+file:///srv/repo?dir=hosts%2Fa", "a.b${c}"}, Layout: partition.Legacy, Resize: "/tmp/e/nixvm-resize"}, nil,
			[]string{"nix", "--extra-experimental-features", nixFeatures, "build", "--impure", "--expr",
				strings.ReplaceAll(flakeExpr("git+file:///srv/repo?dir=hosts%2Fa", `a.b\${c}`, legacy), `\"a.b\${c}\"`, `\"a.b\\\${c}\"`),
				"--out-link", "/tmp/e/result"}},
		{"flake, dry run", nixRequest{Flake: flakeRef{"path:/srv/f", "x"}, Layout: partition.EFI, Eval: true}, nil,
			[]string{"nix", "--extra-experimental-features", nixFeatures, "eval", "--raw", "--impure", "--expr",
				"(" + flakeExpr("path:/srv/f", "x", `({ lib, ... }: { nixvm.layout = lib.mkForce "efi"; })`) + ").outPath"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.Module = "/tmp/e/g.nix"
			if !tc.req.Eval {
				tc.req.OutLink = "/tmp/e/result"
			}
			got, err := nixCommand(tc.req, tc.pt)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(got, "\x00") != strings.Join(tc.want, "\x00") {
				t.Errorf("nixCommand:\ngot  %q\nwant %q", got, tc.want)
			}
			// --dry-run evaluates only: nothing that builds.
			if tc.req.Eval && (got[0] == "nix-build" || got[0] == "nix" && got[3] == "build") {
				t.Errorf("a dry run runs %s", got[0])
			}
		})
	}
	if _, err := nixCommand(nixRequest{Config: "/a\x00b", Module: "/g", OutLink: "/r"}, nil); err == nil {
		t.Error("a NUL byte in a path: no error")
	}
}

// TestNixEscaping checks nixString and nixPath with Nix itself: each value
// evaluates back to the same string, with nothing interpolated.
func TestNixEscaping(t *testing.T) {
	ni := testutil.NeedTool(t, "nix-instantiate")[0]
	t.Setenv("HOME", "/home/should-not-appear")
	for _, s := range []string{
		"plain", `a"b`, "$HOME", "${builtins.currentSystem}", "$${x}", `\${x}`, "a b", "new\nline", "tab\there",
		`back\slash`, "''", "'' ${x} ''", `"${"`, "end$", "cr\rx", "ünïcode",
	} {
		out, err := exec.Command(ni, "--eval", "--json", "-E", nixString(s)).Output()
		var got string
		if err != nil || json.Unmarshal(out, &got) != nil || got != s {
			t.Errorf("nixString(%q) = %s: Nix reads %q (%v)", s, nixString(s), out, err)
		}
	}
	for _, p := range []string{
		"/etc/nixos/configuration.nix", "/my dir/c.nix", `/q"uote/c.nix`, "/${builtins.currentSystem}/c.nix", "/$HOME/c.nix",
		"/new\nline/c.nix", "/a+b/c_d-e.nix", "/x/'' ${y}/c.nix",
	} {
		out, err := exec.Command(ni, "--eval", "--json", "-E", "toString "+nixPath(p)).Output()
		var got string
		if err != nil || json.Unmarshal(out, &got) != nil || got != p {
			t.Errorf("nixPath(%q) = %s: Nix reads %q (%v)", p, nixPath(p), out, err)
		}
	}
}

func TestParseFlake(t *testing.T) {
	repo := t.TempDir()
	os.Mkdir(filepath.Join(repo, ".git"), 0o755)
	os.WriteFile(filepath.Join(repo, "flake.nix"), []byte("{}"), 0o644)
	os.MkdirAll(filepath.Join(repo, "hosts", "my web", "modules"), 0o755)
	os.WriteFile(filepath.Join(repo, "hosts", "my web", "flake.nix"), []byte("{}"), 0o644)
	plain := t.TempDir()
	os.WriteFile(filepath.Join(plain, "flake.nix"), []byte("{}"), 0o644)
	os.Mkdir(filepath.Join(plain, "sub"), 0o755)
	gitRef := "git+file://" + repo

	t.Chdir(repo)
	for _, tc := range []struct {
		in      string
		want    flakeRef
		wantErr string
	}{
		{".#web", flakeRef{gitRef, "web"}, ""},
		{".#nixosConfigurations.web", flakeRef{gitRef, "web"}, ""},
		{`.#nixosConfigurations."a.b"`, flakeRef{gitRef, "a.b"}, ""},
		{".", flakeRef{gitRef, "thishost"}, ""},
		{".#", flakeRef{gitRef, "thishost"}, ""},
		{"#web", flakeRef{gitRef, "web"}, ""},
		{repo + "#web", flakeRef{gitRef, "web"}, ""},
		{"path:" + repo + "#web", flakeRef{gitRef, "web"}, ""},
		{"./hosts/my web#web", flakeRef{gitRef + "?dir=hosts%2Fmy+web", "web"}, ""},
		{"./hosts/my web/modules#web", flakeRef{gitRef + "?dir=hosts%2Fmy+web", "web"}, ""}, // flake.nix is searched upwards
		{plain + "#web", flakeRef{"path:" + plain, "web"}, ""},
		{plain + "/sub#web", flakeRef{"path:" + plain, "web"}, ""},
		{"github:me/sys#web", flakeRef{"github:me/sys", "web"}, ""},
		{"github:me/sys", flakeRef{"github:me/sys", "thishost"}, ""},
		{"git+https://example.org/sys.git?ref=main#nixosConfigurations.db", flakeRef{"git+https://example.org/sys.git?ref=main", "db"}, ""},
		{"sys#web", flakeRef{"sys", "web"}, ""}, // a registry name
		{"/nonexistent/dir#web", flakeRef{}, "no flake.nix in /nonexistent/dir"},
	} {
		got, err := parseFlake(tc.in, "thishost")
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("parseFlake(%q): got %v, %v; want error %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseFlake(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	if _, err := parseFlake(".", ""); err == nil || !strings.Contains(err.Error(), "hostname is unknown") {
		t.Errorf("no name and no hostname: %v", err)
	}
}

func TestNixPassThrough(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		flake   bool
		want    []string
		wantErr string
	}{
		{nil, false, nil, ""},
		{[]string{"-I", "nixpkgs=/np", "--include", "/extra", "--arg", "x={ a = 1; }", "--argstr", "system=aarch64-linux",
			"--option", "substituters=", "--option", "max-jobs=4", "--show-trace", "--impure"}, false,
			[]string{"-I", "nixpkgs=/np", "-I", "/extra", "--arg", "x", "{ a = 1; }", "--argstr", "system", "aarch64-linux",
				"--option", "substituters", "", "--option", "max-jobs", "4", "--show-trace", "--impure"}, ""},
		{[]string{"--option", "a=b=c"}, true, []string{"--option", "a", "b=c"}, ""},
		{[]string{"--impure", "--show-trace"}, true, []string{"--show-trace"}, ""}, // a flake is evaluated --impure already
		{[]string{"--arg", "x"}, false, nil, `--arg "x": want NAME=VALUE`},
		{[]string{"--option", "=x"}, false, nil, `--option "=x": want NAME=VALUE`},
		{[]string{"--argstr", "system=x"}, true, nil, "a flake takes no arguments"},
		{[]string{"--arg", "configuration=./c.nix"}, false, nil, "the build passes the configuration itself"},
		{[]string{"-I", ""}, false, nil, "-I: empty path"},
	} {
		var o nixOptions
		fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
		o.AddFlags(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		got, err := o.passThrough(tc.flake)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: got %q, %v; want error %q", tc.args, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || strings.Join(got, "\x00") != strings.Join(tc.want, "\x00") {
			t.Errorf("%v (flake %v): got %q, %v; want %q", tc.args, tc.flake, got, err, tc.want)
		}
	}
}
