package main

import (
	"strings"
	"testing"
)

// TestVersion: nixvm-image --version prints one line naming the program
// (the version itself is internal/version's, tested there and, linked with
// -X, in cmd/nixvm-resize).
func TestVersion(t *testing.T) {
	stdout, stderr, code := run(t, "--version")
	if code != exitOK || !strings.HasPrefix(stdout, "nixvm-image ") || strings.Count(stdout, "\n") != 1 || stderr != "" {
		t.Errorf("--version: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}
