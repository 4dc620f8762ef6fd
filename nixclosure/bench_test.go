package nixclosure

import (
	"io"
	"testing"
)

// BenchmarkNarHasher measures NAR hashing of one large regular file, the
// cost HashPath adds per byte of store content.
func BenchmarkNarHasher(b *testing.B) {
	const size = 16 << 20
	chunk := make([]byte, 1<<20)
	b.SetBytes(size)
	for b.Loop() {
		nh := NewNarHasher()
		if err := nh.WriteHeader(&NarHeader{Type: NarRegular, Size: size}); err != nil {
			b.Fatal(err)
		}
		for n := 0; n < size; n += len(chunk) {
			if _, err := nh.Write(chunk); err != nil {
				b.Fatal(err)
			}
		}
		if err := nh.Close(); err != nil {
			b.Fatal(err)
		}
		nh.Sum()
	}
}

// BenchmarkNarWriterSmallFiles measures per-entry overhead: a directory of
// 1000 small files.
func BenchmarkNarWriterSmallFiles(b *testing.B) {
	names := make([]string, 1000)
	for i := range names {
		names[i] = string(rune('a'+i/100%26)) + string(rune('a'+i/10%10)) + string(rune('a'+i%10))
	}
	data := []byte("0123456789abcdef0123456789abcdef0123456789abcdef")
	for b.Loop() {
		nw := NewNarWriter(io.Discard)
		nw.WriteHeader(&NarHeader{Type: NarDirectory})
		for _, n := range names {
			nw.WriteHeader(&NarHeader{Path: n, Type: NarRegular, Size: int64(len(data))})
			nw.Write(data)
		}
		if err := nw.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
