package main

// The Nix front door of build: CONFIG.nix and --flake are built with the
// user's own Nix, with nix/guest.nix added. The command lines come from a
// pure function (nixCommand) that table tests check; Nix strings and paths
// are written with nixString and nixPath, never with Go's %q.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/nixvm-image/nixvm-image/imagebuild/vm"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	nixmodule "github.com/nixvm-image/nixvm-image/nix"
	"github.com/nixvm-image/nixvm-image/partition"
)

// resizePriority is the priority of the build's nixvm.resize.package: below
// mkDefault (1000), which the flake's nixosModules.guest uses, above the
// option's default (1500). A configuration's own package wins.
const resizePriority = 1200

// nixRequest is one evaluation of a NixOS configuration.
type nixRequest struct {
	Config  string   // CONFIG.nix, absolute; or
	Flake   flakeRef // a flake's nixosConfigurations.NAME
	Module  string   // the guest module file
	Layout  partition.Layout
	Resize  string // a directory holding bin/nixvm-resize, for nixvm.resize.package; "" adds none
	OutLink string // the build's out-link
	Eval    bool   // only evaluate the system's store path (--dry-run)
}

// flakeRef is a parsed --flake: Ref as Nix takes it, Name the
// configuration's name under nixosConfigurations.
type flakeRef struct {
	Ref, Name string
}

// nixCommand returns the argv that builds the system (or, with r.Eval,
// prints its store path without building anything), with the pass-through
// flags pt.
func nixCommand(r nixRequest, pt []string) ([]string, error) {
	module := fmt.Sprintf("({ lib, ... }: { nixvm.layout = lib.mkForce %s; })", nixString(string(r.Layout)))
	if r.Resize != "" {
		module = fmt.Sprintf("({ lib, ... }: { nixvm.layout = lib.mkForce %s; nixvm.resize.package = lib.mkOverride %d (builtins.path { name = \"nixvm-resize\"; path = %s; }); })",
			nixString(string(r.Layout)), resizePriority, nixPath(r.Resize))
	}
	for _, s := range []string{r.Config, r.Flake.Ref, r.Flake.Name, r.Module, r.Resize, r.OutLink} {
		if strings.ContainsRune(s, 0) {
			return nil, fmt.Errorf("%q: a NUL byte cannot reach Nix", s)
		}
	}
	if r.Config != "" {
		conf := fmt.Sprintf("{ imports = [ %s %s %s ]; }", nixPath(r.Config), nixPath(r.Module), module)
		if r.Eval {
			return append([]string{"nix-instantiate", "--eval", "--json", "<nixpkgs/nixos>", "-A", "system.outPath", "--arg", "configuration", conf}, pt...), nil
		}
		return append(append([]string{"nix-build", "<nixpkgs/nixos>", "-A", "system", "--arg", "configuration", conf}, pt...), "--out-link", r.OutLink), nil
	}
	name := nixString(r.Flake.Name)
	expr := fmt.Sprintf(`let
  flake = builtins.getFlake %s;
  configurations = flake.nixosConfigurations or { };
in
if !(configurations ? %s) then
  throw "nixvm-image: the flake %s has no nixosConfigurations.%s (it has: ${toString (builtins.attrNames configurations)})"
else
  (configurations.%s.extendModules { modules = [ %s %s ]; }).config.system.build.toplevel`,
		nixString(r.Flake.Ref), name, nixEscape(r.Flake.Ref), nixEscape(nixString(r.Flake.Name)), name, nixPath(r.Module), module)
	nix := []string{"nix", "--extra-experimental-features", "nix-command flakes"}
	if r.Eval {
		return append(append(nix, "eval", "--raw", "--impure", "--expr", "("+expr+").outPath"), pt...), nil
	}
	return append(append(append(nix, "build", "--impure", "--expr", expr), pt...), "--out-link", r.OutLink), nil
}

// nixEscape escapes s for the inside of a Nix string: backslash, double
// quote, every $ (so ${ never interpolates), and the control characters Nix
// has escapes for.
func nixEscape(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, `$`, `\$`, "\n", `\n`, "\r", `\r`, "\t", `\t`).Replace(s)
}

// nixString writes s as a Nix string literal.
func nixString(s string) string { return `"` + nixEscape(s) + `"` }

var nixPathLiteral = regexp.MustCompile(`^(/[A-Za-z0-9._+-]+)+$`)

// nixPath writes an absolute path as a Nix path: a literal when Nix's
// grammar allows one, else (/. + "/the path").
func nixPath(p string) string {
	if nixPathLiteral.MatchString(p) {
		return p
	}
	return "(/. + " + nixString(p) + ")"
}

// parseFlake reads --flake as nixos-rebuild does: FLAKE#NAME or
// FLAKE#nixosConfigurations.NAME, and FLAKE alone (or FLAKE#) for the
// configuration named after this host. A local path (no scheme) becomes a
// git flake when it is in a git repository, as `nix build PATH#…` makes it,
// so only tracked files reach the store; otherwise path:.
func parseFlake(s, hostname string) (flakeRef, error) {
	ref, name := s, ""
	if i := strings.LastIndex(s, "#"); i >= 0 {
		ref, name = s[:i], s[i+1:]
	}
	name = strings.TrimPrefix(name, "nixosConfigurations.")
	if len(name) >= 2 && name[0] == '"' && name[len(name)-1] == '"' {
		name = name[1 : len(name)-1]
	}
	if name == "" {
		if hostname == "" {
			return flakeRef{}, usagef("--flake %q names no configuration and the hostname is unknown; want FLAKE#NAME, e.g. .#baseline (nixosConfigurations.baseline)", s)
		}
		name = hostname
	}
	if ref == "" {
		ref = "."
	}
	if !isLocalFlake(ref) {
		return flakeRef{Ref: ref, Name: name}, nil
	}
	ref = strings.TrimPrefix(ref, "path:")
	abs, err := filepath.Abs(ref)
	if err != nil {
		return flakeRef{}, err
	}
	dir, root, err := findFlake(abs)
	if err != nil {
		return flakeRef{}, usagef("--flake %q: %v", s, err)
	}
	if root == "" {
		return flakeRef{Ref: "path:" + dir, Name: name}, nil
	}
	u := url.URL{Scheme: "git+file", Path: root}
	if rel, _ := filepath.Rel(root, dir); rel != "." {
		u.RawQuery = url.Values{"dir": {filepath.ToSlash(rel)}}.Encode()
	}
	return flakeRef{Ref: u.String(), Name: name}, nil
}

// isLocalFlake: a path, or path:PATH; not a URL or registry name
// (github:o/r, git+https://…, nixpkgs).
func isLocalFlake(ref string) bool {
	if strings.HasPrefix(ref, "/") || strings.HasPrefix(ref, ".") || strings.HasPrefix(ref, "path:") {
		return true
	}
	return !strings.Contains(ref, ":") && strings.Contains(ref, "/")
}

// findFlake finds the directory holding flake.nix, from dir up to the root
// of the git repository holding dir (as Nix searches), and that root ("" when
// dir is in no git repository).
func findFlake(dir string) (flakeDir, gitRoot string, err error) {
	for d := dir; ; d = filepath.Dir(d) {
		if flakeDir == "" && exists(filepath.Join(d, "flake.nix")) {
			flakeDir = d
		}
		if exists(filepath.Join(d, ".git")) {
			gitRoot = d
			break
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	if flakeDir == "" {
		return "", "", fmt.Errorf("no flake.nix in %s or above it", dir)
	}
	if gitRoot != "" && !strings.HasPrefix(flakeDir+"/", gitRoot+"/") {
		gitRoot = ""
	}
	return flakeDir, gitRoot, nil
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// resizeBinary finds the static nixvm-resize the build adds to the
// system: --nixvm-resize, else the one beside this executable (as make build
// and the Nix package install them). It returns "" when there is none beside
// the executable: the configuration must then give nixvm.resize.package.
func resizeBinary(flag string) (string, error) {
	if flag != "" {
		if err := vm.CheckStatic(flag); err != nil {
			return "", usagef("--nixvm-resize: %v", err)
		}
		return flag, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", nil
	}
	if r, err := filepath.EvalSymlinks(exe); err == nil {
		exe = r
	}
	p := filepath.Join(filepath.Dir(exe), "nixvm-resize")
	if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
		return "", nil
	}
	if vm.CheckStatic(p) != nil {
		return "", nil
	}
	return p, nil
}

// buildSystem builds a NixOS configuration and returns its system path. The
// out-link (a GC root while the image is built) is removed by cleanup unless
// --out-link keeps it. With dryRun it prints the commands and evaluates the
// system's path only, building nothing; it returns "" when that system is not
// in the store (there is then no kernel to show the VM stage with).
func (o *nixOptions) buildSystem(ctx context.Context, config, flake string, layout partition.Layout, dryRun bool, stdout, log io.Writer) (string, func(), error) {
	req, err := newNixRequest(config, flake, layout, dryRun)
	if err != nil {
		return "", nil, err
	}
	pt, err := o.passThrough(flake != "")
	if err != nil {
		return "", nil, err
	}
	keep, err := o.keptOutLink()
	if err != nil {
		return "", nil, err
	}
	resize, err := resizeBinary(o.resize)
	if err != nil {
		return "", nil, err
	}
	dir, err := os.MkdirTemp("", "nixvm-image-eval-")
	if err != nil {
		return "", nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	fail := func(err error) (string, func(), error) {
		cleanup()
		return "", nil, err
	}
	if err := req.stage(dir, resize, keep); err != nil {
		return fail(err)
	}
	if dryRun {
		if err := showBuild(req, pt, stdout); err != nil {
			return fail(err)
		}
	}
	argv, err := nixCommand(req, pt)
	if err != nil {
		return fail(err)
	}
	out, err := runNix(ctx, argv, req, log)
	if err != nil {
		return fail(err)
	}
	if dryRun {
		top, err := evaluatedSystem(argv, out, req, stdout)
		if err != nil {
			return fail(err)
		}
		if top == "" {
			cleanup()
			return "", func() {}, nil
		}
		return top, cleanup, nil
	}
	top, err := os.Readlink(req.OutLink)
	if err != nil {
		return fail(fmt.Errorf("%s made no out-link: %w", argv[0], err))
	}
	return top, cleanup, nil
}

// showBuild prints the command a build of req, not only an evaluation,
// would run.
func showBuild(req nixRequest, pt []string, stdout io.Writer) error {
	req.Eval = false
	argv, err := nixCommand(req, pt)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "# the build would run (--dry-run only evaluates, building nothing):\n%s\n", shquote.Join(argv))
	return nil
}

// newNixRequest starts the request for CONFIG.nix, or else for --flake.
func newNixRequest(config, flake string, layout partition.Layout, dryRun bool) (nixRequest, error) {
	req := nixRequest{Layout: layout, Eval: dryRun}
	if config != "" {
		if _, err := os.Stat(config); err != nil {
			return req, usagef("CONFIG.nix: %v", err)
		}
		abs, err := filepath.Abs(config)
		if err != nil {
			return req, err
		}
		req.Config = abs
		return req, nil
	}
	host, _ := os.Hostname()
	ref, err := parseFlake(flake, host)
	if err != nil {
		return req, err
	}
	req.Flake = ref
	return req, nil
}

// stage writes the guest module and a copy of the resize binary (when
// not "") into dir, and sets the out-link: keep, else one in dir.
func (req *nixRequest) stage(dir, resize, keep string) error {
	req.Module = filepath.Join(dir, "nixvm-guest.nix")
	if err := os.WriteFile(req.Module, nixmodule.GuestModule, 0o644); err != nil {
		return err
	}
	if resize != "" {
		req.Resize = filepath.Join(dir, "nixvm-resize")
		if err := copyExecutable(resize, filepath.Join(req.Resize, "bin", "nixvm-resize")); err != nil {
			return err
		}
	}
	req.OutLink = filepath.Join(dir, "result")
	if keep != "" {
		req.OutLink = keep
	}
	return nil
}

// runNix runs argv, logging the command and Nix's messages to log when
// not nil, and returns its standard output.
func runNix(ctx context.Context, argv []string, req nixRequest, log io.Writer) ([]byte, error) {
	if log != nil {
		what := "evaluating and building the system"
		if req.Eval {
			what = "evaluating the system"
		}
		fmt.Fprintf(log, "%s: %s\n", what, shquote.Join(argv))
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out, stderr bytes.Buffer
	cmd.Stdout = &out
	if log != nil {
		cmd.Stderr = io.MultiWriter(&stderr, prefixWriter(log, "nix: "))
	} else {
		cmd.Stderr = &stderr
	}
	if err := cmd.Run(); err != nil {
		return nil, nixError(argv, err, stderr.String(), req)
	}
	return out.Bytes(), nil
}

// evaluatedSystem reads the system path an evaluation printed and says on
// stdout whether it is built; it returns "" when it is not.
func evaluatedSystem(argv []string, out []byte, req nixRequest, stdout io.Writer) (string, error) {
	top := strings.TrimSpace(string(out))
	if req.Config != "" {
		if err := json.Unmarshal(out, &top); err != nil {
			return "", fmt.Errorf("%s printed %q, not a store path", argv[0], string(out))
		}
	}
	if _, err := os.Stat(top); err != nil {
		fmt.Fprintf(stdout, "# system: %s, not built; the VM stage boots its kernel once the build has built it\n", top)
		return "", nil
	}
	fmt.Fprintf(stdout, "# system: %s (already built)\n", top)
	return top, nil
}

// nixError is the error of a failed Nix run: the command, Nix's message
// (its tail) and a hint for the usual causes.
func nixError(argv []string, err error, msg string, req nixRequest) error {
	if len(msg) > 4000 {
		msg = "..." + msg[len(msg)-4000:]
	}
	hint := ""
	switch {
	case strings.Contains(msg, "nixpkgs/nixos") && strings.Contains(msg, "not found"):
		hint = "\nnix cannot find <nixpkgs/nixos>: set NIX_PATH (e.g. NIX_PATH=nixpkgs=/path/to/nixpkgs), pass -I nixpkgs=PATH, or use --flake"
	case strings.Contains(msg, "nixvm.resize.package is null"):
		hint = "\nthis nixvm-image has no nixvm-resize beside it: pass --nixvm-resize FILE (a static nixvm-resize), or set nixvm.resize.package in the configuration"
	case strings.HasPrefix(req.Flake.Ref, "git+file:") && strings.Contains(msg, "does not exist"):
		hint = "\na flake in a git repository is evaluated as a git flake, which sees only files tracked by git: git add them"
	}
	var ee *exec.Error
	if errors.As(err, &ee) {
		hint += fmt.Sprintf("\n%s is not installed or not on PATH", argv[0])
	}
	return fmt.Errorf("%s: %w\n%s%s", shquote.Join(argv), err, strings.TrimSpace(msg), hint)
}

// copyExecutable copies the file src to dst (mode 0555), making dst's
// directory.
func copyExecutable(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o555)
}

// prefixWriter prefixes every line written to w.
func prefixWriter(w io.Writer, prefix string) io.Writer {
	atStart := true
	return writerFunc(func(b []byte) (int, error) {
		var out bytes.Buffer
		for _, c := range b {
			if atStart {
				out.WriteString(prefix)
				atStart = false
			}
			out.WriteByte(c)
			if c == '\n' {
				atStart = true
			}
		}
		if _, err := w.Write(out.Bytes()); err != nil {
			return 0, err
		}
		return len(b), nil
	})
}
