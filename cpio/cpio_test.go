package cpio

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

type entry struct {
	hdr  Header
	data string
}

var sample = []entry{
	{Header{Name: "bin", Mode: TypeDir | 0o755, MTime: 1}, ""},
	{Header{Name: "bin/hello", Mode: 0o755, MTime: 1, Size: 6}, "hello\n"},
	{Header{Name: "bin/sh", Mode: TypeSymlink | 0o777, MTime: 1, Linkname: "hello"}, ""},
	{Header{Name: "dev", Mode: TypeDir | 0o755, MTime: 1}, ""},
	{Header{Name: "dev/console", Mode: TypeChar | 0o600, MTime: 1, RDevMajor: 5, RDevMinor: 1}, ""},
	{Header{Name: "empty", Mode: 0o644, MTime: 1}, ""},
	{Header{Name: "odd", Mode: 0o644, UID: 1000, GID: 100, MTime: 1700000000, Size: 3}, "abc"},
}

func build(t testing.TB, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if err := w.WriteHeader(&h); err != nil {
			t.Fatalf("WriteHeader(%q): %v", h.Name, err)
		}
		if _, err := io.WriteString(w, e.data); err != nil {
			t.Fatalf("Write(%q): %v", h.Name, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return buf.Bytes()
}

func TestDeterministic(t *testing.T) {
	a, b := build(t, sample), build(t, sample)
	if !bytes.Equal(a, b) {
		t.Fatal("two builds of the same entries differ")
	}
	if len(a)%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", len(a))
	}
}

func TestCpioTool(t *testing.T) {
	cpioBin := testutil.NeedTool(t, "cpio")[0]
	arc := build(t, sample)

	cmd := exec.Command(cpioBin, "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(arc)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	var want []string
	for _, e := range sample {
		want = append(want, e.hdr.Name)
	}
	if got := strings.Fields(string(out)); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("cpio -t: got %q, want %q", got, want)
	}

	// Extract (no device nodes: they need root and are checked by the listing).
	var noDev []entry
	for _, e := range sample {
		if e.hdr.Mode&TypeMask != TypeChar {
			noDev = append(noDev, e)
		}
	}
	dir := t.TempDir()
	cmd = exec.Command(cpioBin, "-i", "-d", "--quiet", "--no-absolute-filenames", "--preserve-modification-time")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(build(t, noDev))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	for _, e := range noDev {
		p := filepath.Join(dir, e.hdr.Name)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		switch e.hdr.Mode & TypeMask {
		case TypeSymlink:
			if l, _ := os.Readlink(p); l != e.hdr.Linkname {
				t.Errorf("%s: link got %q, want %q", e.hdr.Name, l, e.hdr.Linkname)
			}
		case TypeDir:
			if !fi.IsDir() {
				t.Errorf("%s: not a directory", e.hdr.Name)
			}
		default:
			b, _ := os.ReadFile(p)
			if string(b) != e.data {
				t.Errorf("%s: data got %q, want %q", e.hdr.Name, b, e.data)
			}
			if uint32(fi.Mode().Perm()) != e.hdr.Mode&0o777 {
				t.Errorf("%s: mode got %o, want %o", e.hdr.Name, fi.Mode().Perm(), e.hdr.Mode&0o777)
			}
			if fi.ModTime().Unix() != e.hdr.MTime {
				t.Errorf("%s: mtime got %d, want %d", e.hdr.Name, fi.ModTime().Unix(), e.hdr.MTime)
			}
		}
	}
}

func TestRoundTrip(t *testing.T) {
	arc := build(t, sample)
	r := NewReader(bytes.NewReader(arc))
	for i, e := range sample {
		h, err := r.Next()
		if err != nil {
			t.Fatalf("Next #%d: %v", i, err)
		}
		if h.Name != e.hdr.Name || h.Mode&0o7777 != e.hdr.Mode&0o7777 || h.Linkname != e.hdr.Linkname ||
			h.MTime != e.hdr.MTime || h.UID != e.hdr.UID || h.RDevMajor != e.hdr.RDevMajor {
			t.Errorf("entry %d: got %+v, want %+v", i, h, e.hdr)
		}
		if h.Ino != uint32(i+1) {
			t.Errorf("entry %d: ino got %d, want %d", i, h.Ino, i+1)
		}
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if h.Mode&TypeMask != TypeSymlink && string(b) != e.data {
			t.Errorf("entry %d: data got %q, want %q", i, b, e.data)
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Errorf("after last entry: got %v, want io.EOF", err)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		do   func(w *Writer) error
		want error
	}{
		{"too long", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Size: 1})
			_, err := w.Write([]byte("ab"))
			return err
		}, ErrWriteTooLong},
		{"missing data", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Size: 2})
			w.Write([]byte("a"))
			return w.Close()
		}, ErrMissingData},
		{"sticky", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Size: 2})
			w.WriteHeader(&Header{Name: "b"})
			return w.WriteHeader(&Header{Name: "c"})
		}, ErrMissingData},
		{"after close", func(w *Writer) error {
			w.Close()
			return w.WriteHeader(&Header{Name: "a"})
		}, ErrWriteAfterClose},
		{"size", func(w *Writer) error { return w.WriteHeader(&Header{Name: "a", Size: 1 << 32}) }, ErrFieldTooLong},
		{"empty name", func(w *Writer) error { return w.WriteHeader(&Header{}) }, ErrFieldTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.do(NewWriter(io.Discard)); !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
}

// FuzzRoundTrip writes entries derived from the input and reads them back.
func FuzzRoundTrip(f *testing.F) {
	f.Add("bin/busybox", []byte("\x7fELF"), uint32(0o755), int64(1))
	f.Add("a", []byte{}, uint32(TypeDir|0o555), int64(0))
	f.Add("init", []byte("#!/bin/sh\n"), uint32(0o700), int64(4294967295))
	f.Fuzz(func(t *testing.T, name string, data []byte, mode uint32, mtime int64) {
		if name == "" || name == trailerName || strings.IndexByte(name, 0) >= 0 || mtime < 0 || mtime > 0xffffffff {
			t.Skip()
		}
		mode &^= TypeMask
		mode |= TypeReg
		var buf bytes.Buffer
		w := NewWriter(&buf)
		for i := 0; i < 2; i++ {
			if err := w.WriteHeader(&Header{Name: name, Mode: mode, MTime: mtime, Size: int64(len(data))}); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		r := NewReader(&buf)
		for i := 0; i < 2; i++ {
			h, err := r.Next()
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			if h.Name != name || h.Mode != mode || h.MTime != mtime || !bytes.Equal(got, data) {
				t.Fatalf("got %q %o %d %q, want %q %o %d %q", h.Name, h.Mode, h.MTime, got, name, mode, mtime, data)
			}
		}
		if _, err := r.Next(); err != io.EOF {
			t.Fatalf("got %v, want io.EOF", err)
		}
	})
}

// FuzzReader must not panic or loop on arbitrary input.
func FuzzReader(f *testing.F) {
	f.Add(build(f, sample))
	f.Add([]byte("070701"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		for i := 0; i < 1000; i++ {
			if _, err := r.Next(); err != nil {
				return
			}
			io.Copy(io.Discard, r)
		}
	})
}
