// Package testutil holds helpers shared by the project's tests: finding the
// reference tools (e2fsck, qemu-img, nix-store, ...) and deciding whether a
// test that lacks one may skip.
//
// On a laptop a missing tool skips the test. In CI (.ci/run sets
// NIXVM_TEST_DISALLOW_SKIP=1, and CI=true is honoured too) a missing tool is a
// failure, so a green CI run means every reference check really ran.
package testutil

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// SkipDisallowed reports whether skips must become failures.
func SkipDisallowed() bool {
	return os.Getenv("NIXVM_TEST_DISALLOW_SKIP") != "" || os.Getenv("CI") == "true"
}

// Skip skips the test with the given reason, or fails it when skips are
// disallowed.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	if SkipDisallowed() {
		t.Fatalf("would skip, but skips are disallowed here (NIXVM_TEST_DISALLOW_SKIP/CI): "+format, args...)
	}
	t.Skipf(format, args...)
}

// NeedTool returns the absolute path of each named program, skipping (or
// failing, in CI) the test when one is missing. Programs in /sbin and
// /usr/sbin are found even when those are not on PATH.
func NeedTool(t testing.TB, names ...string) []string {
	t.Helper()
	var paths []string
	for _, n := range names {
		p, err := LookTool(n)
		if err != nil {
			Skip(t, "%s not found: install it (make test installs every test dependency)", n)
		}
		paths = append(paths, p)
	}
	return paths
}

// LookTool finds a program on PATH or in the sbin directories.
func LookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := dir + "/" + name
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return exec.LookPath(name)
}

// NeedRoot skips (or fails, in CI) a test that needs root, e.g. for loop
// devices and mounts.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (loop devices, mount)")
	}
}

// Short skips a slow test under -short. This is not a missing dependency, so it
// skips in CI too; CI does not pass -short.
func Short(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("slow; skipped with -short")
	}
}

// NixOffline are the nix-build/nix-store options that make Nix build here:
// no binary cache, no sandbox.
var NixOffline = []string{"--option", "substituters", "", "--option", "sandbox", "false"}

// Run runs a command and returns its standard output, failing the test with
// the argv and standard error when it fails.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

// SHA256File returns the hex SHA-256 of the file at name, failing the test
// when it cannot be read.
func SHA256File(t testing.TB, name string) string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// RunTool runs the named tool (found as LookTool finds it; the test skips,
// or fails in CI, without it) with stdin as its input when not "", and
// returns its standard output, failing the test with the command, its
// output and its standard error when it fails.
func RunTool(t testing.TB, stdin string, name string, args ...string) string {
	t.Helper()
	p, err := LookTool(name)
	if err != nil {
		Skip(t, "%s not found", name)
	}
	cmd := exec.Command(p, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", p, strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return string(out)
}
