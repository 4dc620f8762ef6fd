package shquote

import (
	"os/exec"
	"testing"
)

func TestJoinRoundTrip(t *testing.T) {
	argv := []string{"printf", "%s\\n", "plain", "", "a b", "it's", "$HOME", "${x}", "`id`", "new\nline", "a\\b", "*"}
	out, err := exec.Command("sh", "-c", Join(argv)).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := ""
	for _, a := range argv[2:] {
		want += a + "\n"
	}
	if string(out) != want {
		t.Fatalf("sh ran %q\ngot  %q\nwant %q", Join(argv), out, want)
	}
	if Quote("a/b.c") != "a/b.c" {
		t.Errorf("Quote(a/b.c) = %q, want it unquoted", Quote("a/b.c"))
	}
}
