package manifest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/zeebo/blake3"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

var update = flag.Bool("update", false, "rewrite testdata/golden-v1.manifest")

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b9)) }

// disk returns size bytes with zero blocks, random blocks, partly filled
// blocks and a few single-byte blocks.
func disk(rng *rand.Rand, size int) []byte {
	b := make([]byte, size)
	for off := 0; off < size; off += BlockSize {
		blk := b[off:min(off+BlockSize, size)]
		switch rng.IntN(4) {
		case 0:
		case 1:
			for i := range blk {
				blk[i] = byte(rng.Uint32())
			}
		case 2:
			for i := 0; i < len(blk)/3; i++ {
				blk[i] = byte(rng.Uint32())
			}
		case 3:
			blk[rng.IntN(len(blk))] = 1
		}
	}
	return b
}

// direct hashes every block one by one: the definition.
func direct(data []byte) []Hash {
	var hs []Hash
	for off := 0; off < len(data); off += BlockSize {
		hs = append(hs, HashBlock(data[off:min(off+BlockSize, len(data))]))
	}
	return hs
}

// hashChunked feeds data to a Hasher in random chunks, skipping some zero
// chunks (gaps).
func hashChunked(t testing.TB, data []byte, workers int, rng *rand.Rand) *Manifest {
	t.Helper()
	h := NewHasher(int64(len(data)), workers)
	for off := 0; off < len(data); {
		n := min(1+rng.IntN(3*BlockSize+100), len(data)-off)
		if rng.IntN(8) == 0 {
			n = min(1+rng.IntN(3<<20), len(data)-off) // larger than a batch
		}
		chunk := data[off : off+n]
		if rng.IntN(3) > 0 || !zeros.All(chunk) {
			if m, err := h.WriteAt(chunk, int64(off)); err != nil || m != n {
				t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", n, off, m, err)
			}
		}
		off += n
	}
	m, err := h.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestZeroHash(t *testing.T) {
	s := blake3.Sum256(make([]byte, BlockSize))
	if ZeroHash() != Hash(s[:16]) {
		t.Errorf("ZeroHash: got %x, want %x", ZeroHash(), s[:16])
	}
	// Zero blocks, written or skipped, hash to ZeroHash; so does a short
	// zero last block.
	const size = 5<<20 + 512
	h := NewHasher(size, 2)
	h.WriteAt(make([]byte, 3<<20+7), 4096)
	m, err := h.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(m.Blocks)) != BlockCount(size) {
		t.Fatalf("blocks: got %d, want %d", len(m.Blocks), BlockCount(size))
	}
	for i, b := range m.Blocks {
		if b != ZeroHash() {
			t.Fatalf("block %d: got %x, want ZeroHash", i, b)
		}
	}
	if HashBlock(make([]byte, 512)) != ZeroHash() {
		t.Errorf("short zero block: not ZeroHash")
	}
}

func TestHasherMatchesDefinition(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		workers int
	}{
		{"empty", 0, 1},
		{"one-sector", 512, 1},
		{"short-last-block", 3<<20 + 1536, 2},
		{"many-batches", 9 << 20, 3},
		{"default-workers", 2<<20 + 4096, 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := disk(newRand(uint64(i)), tt.size)
			want := direct(data)
			m := hashChunked(t, data, tt.workers, newRand(uint64(i+100)))
			if len(m.Blocks) != len(want) {
				t.Fatalf("blocks: got %d, want %d", len(m.Blocks), len(want))
			}
			for j := range want {
				if m.Blocks[j] != want[j] {
					t.Fatalf("block %d: got %x, want %x", j, m.Blocks[j], want[j])
				}
			}
			if m.Digest != ComputeDigest(want) || m.VirtualSize != int64(tt.size) {
				t.Errorf("digest/size: got %x/%d", m.Digest, m.VirtualSize)
			}
			if err := m.Validate(); err != nil {
				t.Error(err)
			}
			// Another worker count and chunking: same manifest.
			m2 := hashChunked(t, data, 5, newRand(uint64(i+200)))
			if m2.Digest != m.Digest {
				t.Errorf("digest with 5 workers: got %x, want %x", m2.Digest, m.Digest)
			}
		})
	}
}

func TestDigestChangesWithOneBlock(t *testing.T) {
	data := disk(newRand(7), 4<<20)
	a := hashChunked(t, data, 2, newRand(1))
	for _, off := range []int{0, 12345, len(data) - 1} {
		mod := bytes.Clone(data)
		mod[off] ^= 0x80
		b := hashChunked(t, mod, 2, newRand(2))
		if b.Digest == a.Digest {
			t.Errorf("byte %d flipped: digest unchanged", off)
		}
		if d := Diff(a, b); len(d) != 1 || d[0] != int64(off/BlockSize) {
			t.Errorf("byte %d flipped: Diff = %v, want [%d]", off, d, off/BlockSize)
		}
	}
}

func TestWriterErrors(t *testing.T) {
	h := NewHasher(1<<20, 1)
	if _, err := h.WriteAt(make([]byte, 10), 100); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt([]byte{1}, 105); !errors.Is(err, ErrNotAscending) {
		t.Errorf("overlap: got %v, want ErrNotAscending", err)
	}
	if _, err := h.WriteAt([]byte{1, 2}, 1<<20-1); !errors.Is(err, ErrBeyondEnd) {
		t.Errorf("past end: got %v, want ErrBeyondEnd", err)
	}
	if _, err := h.Finish(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt([]byte{1}, 1<<19); !errors.Is(err, ErrFinished) {
		t.Errorf("after Finish: got %v, want ErrFinished", err)
	}
	if _, err := NewHasher(MaxVirtualSize+1, 1).Finish(); !errors.Is(err, ErrTooLarge) {
		t.Errorf("huge disk: got %v, want ErrTooLarge", err)
	}
}

func encode(t testing.TB, m *Manifest) []byte {
	t.Helper()
	var b bytes.Buffer
	n, err := m.WriteTo(&b)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(b.Len()) {
		t.Fatalf("WriteTo: reported %d bytes, wrote %d", n, b.Len())
	}
	return b.Bytes()
}

func TestRoundTrip(t *testing.T) {
	for i, size := range []int{0, 512, 4096, 1<<20 + 512, 6 << 20} {
		data := disk(newRand(uint64(i)), size)
		m := hashChunked(t, data, 2, newRand(9))
		enc := encode(t, m)
		// Trailing data stays in the reader: Read takes exactly its bytes.
		r := bytes.NewReader(append(bytes.Clone(enc), "tail"...))
		got, err := Read(r)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if r.Len() != 4 {
			t.Errorf("size %d: Read left %d bytes, want 4", size, r.Len())
		}
		if got.VirtualSize != m.VirtualSize || got.Digest != m.Digest || len(got.Blocks) != len(m.Blocks) {
			t.Fatalf("size %d: got %d/%x/%d blocks, want %d/%x/%d", size, got.VirtualSize, got.Digest, len(got.Blocks), m.VirtualSize, m.Digest, len(m.Blocks))
		}
		for j := range m.Blocks {
			if got.Blocks[j] != m.Blocks[j] {
				t.Fatalf("size %d block %d differs", size, j)
			}
		}
		if again := encode(t, got); !bytes.Equal(again, enc) {
			t.Errorf("size %d: re-encoding differs", size)
		}
	}
}

func TestCompactZeroRuns(t *testing.T) {
	// A 16 GiB disk with one non-zero block in the middle.
	const size = 16 << 30
	h := NewHasher(size, 1)
	h.WriteAt([]byte{1}, size/2)
	m, err := h.Finish()
	if err != nil {
		t.Fatal(err)
	}
	enc := encode(t, m)
	if len(enc) > 200 {
		t.Errorf("16 GiB disk with one data block: %d bytes encoded, want under 200", len(enc))
	}
	got, err := Read(bytes.NewReader(enc))
	if err != nil {
		t.Fatal(err)
	}
	if got.Blocks[size/2/BlockSize] == ZeroHash() || got.Digest != m.Digest {
		t.Errorf("decoded manifest differs")
	}
}

// reseal recomputes the trailing checksum after a deliberate change.
func reseal(b []byte) []byte {
	s := blake3.Sum256(b[:len(b)-checksumLen])
	copy(b[len(b)-checksumLen:], s[:])
	return b
}

func TestReadErrors(t *testing.T) {
	m := hashChunked(t, disk(newRand(3), 256<<10), 1, newRand(4))
	good := encode(t, m)
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	const secData = fileHeaderLen + sectionHdrLen // offset of the block-list header
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"short-header", good[:10], ErrTruncated},
		{"no-payload", good[:fileHeaderLen], ErrTruncated},
		{"no-checksum", good[:len(good)-1], ErrTruncated},
		{"magic", mod(func(b []byte) []byte { b[0] = 'X'; return b }), ErrNotManifest},
		{"qcow2-file", []byte("QFI\xfb\x00\x00\x00\x03aaaaaaaaaaaaaaaaaaaaaaaaaa"), ErrNotManifest},
		{"version", mod(func(b []byte) []byte { b[11] = 2; return b }), ErrVersion},
		{"huge-payload", mod(func(b []byte) []byte { binary.BigEndian.PutUint64(b[16:], 1<<62); return b }), ErrTooLarge},
		{"flipped-hash-bit", mod(func(b []byte) []byte { b[len(b)-40] ^= 1; return b }), ErrChecksum},
		{"flipped-checksum", mod(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), ErrChecksum},
		{"resealed-hash-bit", mod(func(b []byte) []byte { b[len(b)-40] ^= 1; return reseal(b) }), ErrCorrupt},
		{"resealed-size", mod(func(b []byte) []byte {
			binary.BigEndian.PutUint64(b[secData:], uint64(m.VirtualSize)+BlockSize)
			return reseal(b)
		}), ErrCorrupt},
		{"resealed-too-large", mod(func(b []byte) []byte {
			binary.BigEndian.PutUint64(b[secData:], 1<<50)
			return reseal(b)
		}), ErrTooLarge},
		{"resealed-block-size", mod(func(b []byte) []byte { b[secData+10] = 0x20; return reseal(b) }), ErrCorrupt},
		{"resealed-unknown-required-section", mod(func(b []byte) []byte {
			b[fileHeaderLen+3] = 7
			return reseal(b)
		}), ErrVersion},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Read(bytes.NewReader(tt.in))
			if !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
	// Every truncation fails cleanly.
	for n := range len(good) {
		if _, err := Read(bytes.NewReader(good[:n])); !errors.Is(err, ErrTruncated) {
			t.Fatalf("truncated to %d bytes: got %v, want ErrTruncated", n, err)
		}
	}
	// Every single-bit flip is caught.
	for i := range good {
		b := bytes.Clone(good)
		b[i] ^= 0x10
		if _, err := Read(bytes.NewReader(b)); err == nil {
			t.Fatalf("bit flip at byte %d accepted", i)
		}
	}
}

func TestUnknownOptionalSectionSkipped(t *testing.T) {
	m := hashChunked(t, disk(newRand(5), 64<<10), 1, newRand(6))
	good := encode(t, m)
	// Append an optional section (type 2) to the payload.
	extra := binary.BigEndian.AppendUint32(nil, 2)
	extra = binary.BigEndian.AppendUint32(extra, 0)
	extra = binary.BigEndian.AppendUint64(extra, 3)
	extra = append(extra, "abc"...)
	payload := good[fileHeaderLen : len(good)-checksumLen]
	b := append(bytes.Clone(good[:fileHeaderLen]), payload...)
	b = append(b, extra...)
	binary.BigEndian.PutUint64(b[16:], uint64(len(payload)+len(extra)))
	b = reseal(append(b, make([]byte, checksumLen)...))
	got, err := Read(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != m.Digest {
		t.Errorf("digest: got %x, want %x", got.Digest, m.Digest)
	}
}

// TestGolden pins the version 1 encoding and the hash definition. The golden
// file was written by: go test ./manifest -run TestGolden -update
func TestGolden(t *testing.T) {
	data := disk(newRand(42), 64<<10+512)
	m := hashChunked(t, data, 1, newRand(43))
	enc := encode(t, m)
	path := filepath.Join("testdata", "golden-v1.manifest")
	if *update {
		if err := os.WriteFile(path, enc, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc, want) {
		t.Errorf("encoding differs from %s (format or hash definition changed?)", path)
	}
}

func FuzzRead(f *testing.F) {
	// Zero runs of a 1 TiB disk cost 4 GiB of memory but test nothing new.
	readMaxSize = 64 << 20
	f.Cleanup(func() { readMaxSize = MaxVirtualSize })
	f.Add([]byte{})
	for i, size := range []int{0, 4096, 40960} {
		m := hashChunked(f, disk(newRand(uint64(i)), size), 1, newRand(1))
		f.Add(encode(f, m))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		checkRead(t, in)
		// Also as a sealed payload, so the fuzzer gets past the checksum.
		checkRead(t, seal(in))
	})
}

// seal wraps a payload in a version 1 header and checksum.
func seal(payload []byte) []byte {
	b := append([]byte(magic), 0, 0, 0, version, 0, 0, 0, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(len(payload)))
	b = append(b, payload...)
	return reseal(append(b, make([]byte, checksumLen)...))
}

func checkRead(t *testing.T, in []byte) {
	m, err := Read(bytes.NewReader(in))
	if err != nil {
		return
	}
	if err := m.Validate(); err != nil {
		t.Fatalf("Read accepted an invalid manifest: %v", err)
	}
	// What Read accepts is canonical: it re-encodes to a prefix of in.
	if enc := encode(t, m); !bytes.HasPrefix(in, enc) && !hasOtherSections(in) {
		t.Fatalf("re-encoding differs")
	}
}

// hasOtherSections reports whether the payload has more than the block list
// (skipped optional sections are not re-encoded).
func hasOtherSections(in []byte) bool {
	if len(in) < fileHeaderLen+sectionHdrLen {
		return false
	}
	plen := binary.BigEndian.Uint64(in[16:])
	slen := binary.BigEndian.Uint64(in[fileHeaderLen+8:])
	return plen != sectionHdrLen+slen || binary.BigEndian.Uint32(in[fileHeaderLen:]) != sectionBlocks
}

func BenchmarkHasher(b *testing.B) {
	data := disk(newRand(1), 64<<20)
	for i := 0; i < len(data)/BlockSize; i += 4 { // no zero blocks
		data[i*BlockSize] |= 1
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		h := NewHasher(int64(len(data)), 0)
		for off := 0; off < len(data); off += 1 << 20 {
			h.WriteAt(data[off:off+1<<20], int64(off))
		}
		if _, err := h.Finish(); err != nil {
			b.Fatal(err)
		}
	}
}
