package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

func TestExitCodes(t *testing.T) {
	tests := []struct {
		args []string
		want int
		out  string
	}{
		{[]string{"-help"}, exitOK, "EXIT STATUS"},
		{[]string{"--bogus"}, exitUsage, "flag provided but not defined"},
		{[]string{"extra"}, exitUsage, ""},
		{[]string{"--mountpoint", "/nonexistent/nixvm-resize-test"}, exitError, ""},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(tt.args, &stdout, &stderr)
			if got := exitCode(err); got != tt.want {
				t.Errorf("exit code got %d, want %d (err %v)", got, tt.want, err)
			}
			if !strings.Contains(stderr.String(), tt.out) {
				t.Errorf("stderr lacks %q:\n%s", tt.out, stderr.String())
			}
		})
	}
	if got := exitCode(leftAloneError{errors.New("x")}); got != exitLeftAlone {
		t.Errorf("left alone with --strict: got %d, want %d", got, exitLeftAlone)
	}
}

// TestVersion: --version prints the version and touches nothing; a binary
// linked with -X internal/version.Version (as the Nix package links it)
// prints that version.
func TestVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if err := run([]string{"--version", "--mountpoint", "/nonexistent"}, &stdout, &stderr); err != nil {
		t.Fatalf("--version: %v\n%s", err, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "nixvm-resize ") || strings.Count(stdout.String(), "\n") != 1 {
		t.Errorf("--version printed %q", stdout.String())
	}
	goTool := testutil.NeedTool(t, "go")[0]
	bin := filepath.Join(t.TempDir(), "nixvm-resize")
	cmd := exec.Command(goTool, "build", "-trimpath", "-ldflags", "-X github.com/nixvm-image/nixvm-image/internal/version.Version=9.8.7", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "nixvm-resize 9.8.7 (go") {
		t.Errorf("%s --version: %v %q, want nixvm-resize 9.8.7 (go…)", bin, err, out)
	}
}
