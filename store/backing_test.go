package store

import (
	"bytes"
	"errors"
	"testing"
)

func TestBackingFile(t *testing.T) {
	hdr := func(version uint32, off uint64, n uint32, name string) []byte {
		b := make([]byte, 512)
		copy(b, "QFI\xfb")
		b[7] = byte(version)
		for i := range 8 {
			b[8+i] = byte(off >> (56 - 8*i))
		}
		for i := range 4 {
			b[16+i] = byte(n >> (24 - 8*i))
		}
		copy(b[off:], name)
		return b
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
		err  error
	}{
		{"none", hdr(3, 0, 0, ""), "", nil},
		{"v3", hdr(3, 200, 9, "/base.img"), "/base.img", nil},
		{"v2 relative", hdr(2, 72, 4, "b.qc"), "b.qc", nil},
		{"raw", make([]byte, 512), "", ErrNotQcow2},
		{"short", []byte("QFI"), "", ErrNotQcow2},
		{"version 4", hdr(4, 0, 0, ""), "", ErrBadHeader},
		{"name past end", hdr(3, 500, 100, ""), "", ErrBadHeader},
		{"name too long", hdr(3, 200, 5000, ""), "", ErrBadHeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := BackingFile(bytes.NewReader(tc.in))
			if got != tc.want || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Errorf("got %q, %v, want %q, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

// FuzzBackingFile: BackingFile never panics, never returns a name longer
// than QEMU allows, and a name it returns is exactly the bytes the header
// points at.
func FuzzBackingFile(f *testing.F) {
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x04/a/b"))
	f.Add(make([]byte, 100))
	f.Fuzz(func(t *testing.T, b []byte) {
		name, err := BackingFile(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(name) > maxBackingName {
			t.Fatalf("name of %d bytes", len(name))
		}
		if name != "" {
			off := int(b[8])<<56 | int(b[9])<<48 | int(b[10])<<40 | int(b[11])<<32 | int(b[12])<<24 | int(b[13])<<16 | int(b[14])<<8 | int(b[15])
			if off+len(name) > len(b) || string(b[off:off+len(name)]) != name {
				t.Fatalf("name %q is not the bytes at %d", name, off)
			}
		}
	})
}
