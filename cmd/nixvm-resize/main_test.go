package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"
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
