package main

import (
	"strings"
	"testing"
)

// TestPushRemoteStderrSanitized (issue 12 item 9): what the remote writes
// to stderr is shown in errors without escape sequences or control
// characters. Before the fix ESC and BEL came through.
func TestPushRemoteStderrSanitized(t *testing.T) {
	var b tailBuffer
	b.Write([]byte("serve: failed\x1b]0;pwned\x07\x1b[2J\u009b31m\r\nnext line"))
	got := b.String()
	if strings.ContainsAny(got, "\x1b\x07\r\u009b") {
		t.Errorf("remote stderr kept control characters: %q", got)
	}
	if !strings.Contains(got, "serve: failed") || !strings.Contains(got, "\nnext line") {
		t.Errorf("remote stderr lost its text: %q", got)
	}
}
