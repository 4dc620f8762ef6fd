package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/qcow"
)

// TestPublishPullCLI publishes a qcow2 with a signing key to a directory
// and pulls it with --trust and --link, through the CLI; bad flags exit 2.
func TestPublishPullCLI(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte("nixvm publish cli "), 300000)[:4<<20]
	f, err := os.Create(filepath.Join(dir, "img.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	w, err := qcow.NewWriter(f, int64(len(data)), qcow.Options{Compression: qcow.Zstd})
	if err != nil {
		t.Fatal(err)
	}
	w.WriteAt(data, 0)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	pub := "file://" + filepath.Join(dir, "pub")
	key := filepath.Join(dir, "k")
	out, _, code := run(t, "publish", "--gen-key", key)
	if code != 0 || !strings.HasPrefix(out, "nixvm-image ed25519 public ") {
		t.Fatalf("--gen-key: %d %q", code, out)
	}
	if out, errs, code := run(t, "publish", filepath.Join(dir, "img.qcow2"), "--name", "cli", "--to", pub, "--sign-key", key, "--index-cache", filepath.Join(dir, "cache")); code != 0 || !strings.Contains(out, "signed") {
		t.Fatalf("publish: %d %s %s", code, out, errs)
	}
	link := filepath.Join(dir, "virt", "cli.qcow2")
	store := filepath.Join(dir, "store")
	out, errs, code := run(t, "pull", pub, "--name", "cli", "--store-dir", store, "--trust", key+".pub", "--link", link)
	if code != 0 || !strings.Contains(out, "installed") {
		t.Fatalf("pull: %d %s %s", code, out, errs)
	}
	if _, err := os.Stat(link); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"publish", "x.qcow2", "--name", "../x", "--to", pub},
		{"publish", "x.qcow2", "--name", "x"},
		{"publish", "x.qcow2", "--name", "x", "--to", "http://example.invalid/x"},
		{"pull", pub, "--name", "a/b"},
		{"pull", pub, "--name", "x", "--link", "relative"},
		{"pull", pub, "--name", "x", "--trust", "not a key"},
	} {
		if _, errs, code := run(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", args, code, errs)
		}
	}
}
