package qcow

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// openQcow2 opens a qcow2 image with go-qcow2reader, with zstd registered.
func openQcow2(t testing.TB, ra io.ReaderAt) image.Image {
	t.Helper()
	RegisterReaderCodecs()
	img, err := qcow2reader.Open(ra)
	if err != nil {
		t.Fatalf("go-qcow2reader: %v", err)
	}
	return img
}

// readAll reads the virtual disk through go-qcow2reader, a cluster at a time.
func readAll(t testing.TB, img image.Image, cs int64) []byte {
	t.Helper()
	out := make([]byte, img.Size())
	for off := int64(0); off < img.Size(); off += cs {
		end := min(off+cs, img.Size())
		if _, err := img.ReadAt(out[off:end], off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("go-qcow2reader ReadAt(%d, %d): %v", end-off, off, err)
		}
	}
	return out
}

// pattern builds a random virtual disk of size bytes with a mix of zero,
// incompressible, compressible and nearly-zero clusters.
func pattern(rng *rand.Rand, size, cs int64) []byte {
	b := make([]byte, size)
	words := []string{"nix", "store", "/nix/store/", "lib", "bin", "share", "ELF", "\x00\x00\x00\x00"}
	for off := int64(0); off < size; off += cs {
		end := min(off+cs, size)
		c := b[off:end]
		switch rng.IntN(6) {
		case 0: // zero
		case 1: // incompressible
			for i := range c {
				c[i] = byte(rng.Uint32())
			}
		case 2, 3: // compressible text
			var s strings.Builder
			for int64(s.Len()) < int64(len(c)) {
				s.WriteString(words[rng.IntN(len(words))])
				fmt.Fprintf(&s, "%d ", rng.IntN(1000))
			}
			copy(c, s.String())
		case 4: // a few bytes in a zero cluster
			for range 1 + rng.IntN(8) {
				c[rng.IntN(len(c))] = byte(1 + rng.IntN(255))
			}
		case 5: // half random, half zero: compresses to about half
			for i := 0; i < len(c)/2; i++ {
				c[i] = byte(rng.Uint32())
			}
		}
	}
	return b
}

// writeImage writes data through a Writer in random-sized chunks, skipping
// zero chunks (gaps) at random.
func writeImage(t testing.TB, dst io.WriterAt, data []byte, opts Options, rng *rand.Rand) *Writer {
	t.Helper()
	w, err := NewWriter(dst, int64(len(data)), opts)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); {
		n := min(1+rng.IntN(200_000), len(data)-off)
		chunk := data[off : off+n]
		if rng.IntN(3) > 0 || !zeros.All(chunk) {
			if m, err := w.WriteAt(chunk, int64(off)); err != nil || m != n {
				t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", n, off, m, err)
			}
		}
		off += n
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return w
}

// qemuImg runs qemu-img and returns its stdout, failing with argv and stderr.
func qemuImg(t testing.TB, args ...string) []byte {
	t.Helper()
	p := testutil.NeedTool(t, "qemu-img")[0]
	cmd := exec.Command(p, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", p, strings.Join(args, " "), err, out, stderr.String())
	}
	return out
}

type qemuInfo struct {
	VirtualSize    int64  `json:"virtual-size"`
	Format         string `json:"format"`
	ClusterSize    int64  `json:"cluster-size"`
	FormatSpecific struct {
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
			RefcountBits    int    `json:"refcount-bits"`
			Corrupt         bool   `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
}

type qemuCheck struct {
	Leaks              int   `json:"leaks"`
	Corruptions        int   `json:"corruptions"`
	CheckErrors        int   `json:"check-errors"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
	ImageEndOffset     int64 `json:"image-end-offset"`
}

// verify checks a written image against the raw data with qemu-img (check,
// compare, info) and go-qcow2reader.
func verify(t *testing.T, dir, img string, data []byte, opts Options) {
	t.Helper()
	o := opts.withDefaults()
	raw := filepath.Join(dir, "raw.img")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	// qemu-img check exits non-zero on leaks or corruptions.
	var chk qemuCheck
	if err := json.Unmarshal(qemuImg(t, "check", "-f", "qcow2", "--output=json", img), &chk); err != nil {
		t.Fatal(err)
	}
	if chk.Leaks != 0 || chk.Corruptions != 0 || chk.CheckErrors != 0 {
		t.Errorf("qemu-img check: %+v", chk)
	}
	qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", img, raw)

	var info qemuInfo
	if err := json.Unmarshal(qemuImg(t, "info", "--output=json", img), &info); err != nil {
		t.Fatal(err)
	}
	wantComp := "zlib"
	if o.Compression == Zstd {
		wantComp = "zstd"
	}
	if info.Format != "qcow2" || info.VirtualSize != int64(len(data)) || info.ClusterSize != 1<<o.ClusterBits ||
		info.FormatSpecific.Data.CompressionType != wantComp || info.FormatSpecific.Data.Compat != "1.1" ||
		info.FormatSpecific.Data.RefcountBits != 16 || info.FormatSpecific.Data.Corrupt {
		t.Errorf("qemu-img info: got %+v, want qcow2 compat 1.1, virtual size %d, cluster size %d, compression %s, 16-bit refcounts",
			info, len(data), 1<<o.ClusterBits, wantComp)
	}

	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := readAll(t, openQcow2(t, f), 1<<o.ClusterBits)
	if !bytes.Equal(got, data) {
		t.Errorf("go-qcow2reader: read-back differs from the source at byte %d", firstDiff(got, data))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func TestRoundTripQemu(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	tests := []struct {
		name string
		size int64
		opts Options
		seed uint64
	}{
		{"zstd", 24<<20 + 512*7, Options{}, 1},
		{"zlib", 24<<20 + 512*7, Options{Compression: Zlib}, 2},
		{"none", 24<<20 + 512*7, Options{Compression: None}, 3},
		{"zstd-level19", 4 << 20, Options{Level: 19}, 4},
		{"zstd-4k-clusters", 6 << 20, Options{ClusterBits: 12}, 5},
		{"zlib-512-clusters", 1 << 20, Options{ClusterBits: 9, Compression: Zlib}, 6},
		{"zstd-2m-clusters", 9 << 20, Options{ClusterBits: 21}, 7},
		{"tiny", 512, Options{}, 8},
		{"empty-disk", 0, Options{}, 9},
		{"one-worker", 8 << 20, Options{Workers: 1}, 10},
		// 512-byte clusters: 66 refcount blocks, a two-cluster refcount
		// table and a multi-cluster L1 table.
		{"none-512-clusters", 12 << 20, Options{ClusterBits: 9, Compression: None}, 11},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(tt.seed, 42))
			o := tt.opts.withDefaults()
			data := pattern(rng, tt.size, 1<<o.ClusterBits)
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			f, err := os.Create(img)
			if err != nil {
				t.Fatal(err)
			}
			w := writeImage(t, f, data, tt.opts, rng)
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			st := w.Stats()
			fi, _ := os.Stat(img)
			if fi.Size() != st.FileSize {
				t.Errorf("file size: got %d, want Stats.FileSize %d", fi.Size(), st.FileSize)
			}
			t.Logf("%+v", st)
			verify(t, dir, img, data, tt.opts)
		})
	}
}

// TestAllocatedClustersMatchQemu checks the counts qemu-img check reports
// against ours: every non-zero cluster allocated, zero clusters not.
func TestAllocatedClustersMatchQemu(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	rng := rand.New(rand.NewPCG(11, 12))
	data := pattern(rng, 16<<20, 1<<16)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	w := writeImage(t, f, data, Options{}, rng)
	f.Close()
	var chk qemuCheck
	if err := json.Unmarshal(qemuImg(t, "check", "--output=json", img), &chk); err != nil {
		t.Fatal(err)
	}
	st := w.Stats()
	var nonZero int64
	for off := 0; off < len(data); off += 1 << 16 {
		if !zeros.All(data[off : off+1<<16]) {
			nonZero++
		}
	}
	if chk.AllocatedClusters != nonZero || st.RawClusters+st.CompressedClusters != nonZero {
		t.Errorf("allocated clusters: qemu-img got %d, Stats got %d+%d, want %d", chk.AllocatedClusters, st.RawClusters, st.CompressedClusters, nonZero)
	}
	if chk.CompressedClusters != st.CompressedClusters || st.CompressedClusters == 0 {
		t.Errorf("compressed clusters: qemu-img got %d, Stats got %d", chk.CompressedClusters, st.CompressedClusters)
	}
	if chk.ImageEndOffset != st.FileSize {
		t.Errorf("image end offset: qemu-img got %d, want %d", chk.ImageEndOffset, st.FileSize)
	}
}

// TestDeterministic writes the same data with 1 and 4 workers, with
// different chunkings, and wants identical bytes.
func TestDeterministic(t *testing.T) {
	for _, c := range []Compression{Zstd, Zlib, None} {
		t.Run(c.String(), func(t *testing.T) {
			data := pattern(rand.New(rand.NewPCG(21, 22)), 12<<20, 1<<16)
			var sums [][32]byte
			for i, workers := range []int{1, 4, 3} {
				var buf memFile
				writeImage(t, &buf, data, Options{Compression: c, Workers: workers}, rand.New(rand.NewPCG(uint64(i), 1)))
				sums = append(sums, sha256.Sum256(buf.b))
			}
			for i := 1; i < len(sums); i++ {
				if sums[i] != sums[0] {
					t.Errorf("run %d: sha256 %x, want %x (run 0)", i, sums[i], sums[0])
				}
			}
		})
	}
}

func TestCopySparse(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "sparse.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(31, 32))
	data := make([]byte, size)
	// Data regions at 4 KiB granularity, some unaligned to clusters.
	regions := [][2]int64{{0, 8192}, {1 << 20, 3<<20 + 4096}, {10<<20 + 12288, 10<<20 + 65536*3}, {size - 4096, size}}
	for _, r := range regions {
		chunk := data[r[0]:r[1]]
		for i := range chunk {
			chunk[i] = byte(rng.IntN(4))
		}
		if _, err := f.WriteAt(chunk, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "img.qcow2")
	out, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(out, size, Options{})
	if err != nil {
		t.Fatal(err)
	}
	read, err := CopySparse(w, f, size)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	out.Close()
	f.Close()
	// A file system that reports holes (ext4, xfs, btrfs, tmpfs) lets us
	// read exactly the data regions.
	var want int64
	for _, r := range regions {
		want += r[1] - r[0]
	}
	switch {
	case read == size:
		t.Logf("read all %d bytes: the file system here does not report holes", read)
	case read != want:
		t.Errorf("read %d bytes, want %d (the data regions)", read, want)
	}
	verify(t, dir, img, data, Options{})
}

func TestProgress(t *testing.T) {
	var p counter
	data := pattern(rand.New(rand.NewPCG(1, 1)), 3<<20+512, 1<<16)
	writeImage(t, &memFile{}, data, Options{Progress: &p}, rand.New(rand.NewPCG(2, 2)))
	if p.n != int64(len(data)) {
		t.Errorf("progress: got %d bytes, want %d", p.n, len(data))
	}
}

type counter struct{ n int64 }

func (c *counter) Update(n int64) { c.n += n }

func TestErrors(t *testing.T) {
	w, err := NewWriter(&memFile{}, 1<<20, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(make([]byte, 100), 1000); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(make([]byte, 1), 1099); !errors.Is(err, ErrNotAscending) {
		t.Errorf("overlapping write: got %v, want ErrNotAscending", err)
	}
	if _, err := w.WriteAt(make([]byte, 2), 1<<20-1); !errors.Is(err, ErrBeyondEnd) {
		t.Errorf("write past the end: got %v, want ErrBeyondEnd", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte{1}, 1<<19); !errors.Is(err, ErrWriteAfterClose) {
		t.Errorf("write after close: got %v, want ErrWriteAfterClose", err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: got %v, want nil", err)
	}

	if _, err := NewWriter(&memFile{}, 1000, Options{}); !errors.Is(err, ErrInvalidSize) {
		t.Errorf("unaligned size: got %v, want ErrInvalidSize", err)
	}

	// A failing destination makes the error sticky.
	fw, err := NewWriter(failWriter{}, 1<<20, Options{Compression: None, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	var firstErr error
	for off := int64(0); off < 1<<20 && firstErr == nil; off += 1 << 16 {
		_, firstErr = fw.WriteAt(bytes.Repeat([]byte{1}, 1<<16), off)
	}
	if err := fw.Close(); !errors.Is(err, errDisk) {
		t.Errorf("Close after a write error: got %v, want errDisk", err)
	}
}

var errDisk = errors.New("disk on fire")

type failWriter struct{}

func (failWriter) WriteAt([]byte, int64) (int, error) { return 0, errDisk }

func TestValidate(t *testing.T) {
	tests := []struct {
		opts Options
		ok   bool
	}{
		{Options{}, true},
		{Options{ClusterBits: 9}, true},
		{Options{ClusterBits: 21, Compression: None}, true},
		{Options{ClusterBits: 8}, false},
		{Options{ClusterBits: 22}, false},
		{Options{Level: 22}, true},
		{Options{Level: 23}, false},
		{Options{Level: -1}, false},
		{Options{Compression: Zlib, Level: 6}, false},
		{Options{Compression: None, Level: 1}, false},
		{Options{Compression: 7}, false},
		{Options{Workers: -1}, false},
	}
	for _, tt := range tests {
		err := tt.opts.Validate()
		if (err == nil) != tt.ok {
			t.Errorf("%+v.Validate() = %v, want ok=%v", tt.opts, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%+v.Validate() = %v, want ErrInvalidOptions", tt.opts, err)
		}
	}
	for _, c := range []Compression{Zstd, Zlib, None} {
		if got, err := ParseCompression(c.String()); err != nil || got != c {
			t.Errorf("ParseCompression(%q) = %v, %v", c.String(), got, err)
		}
	}
}

// memFile is an in-memory io.WriterAt/io.ReaderAt.
type memFile struct {
	mu sync.Mutex
	b  []byte
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed)) }

// TestQemuCheckCatchesBadRefcount makes sure the oracle can fail: an image
// whose header cluster has refcount 0 must be rejected by qemu-img check.
func TestQemuCheckCatchesBadRefcount(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	var m memFile
	writeImage(t, &m, pattern(newRand(5), 2<<20, 1<<16), Options{}, newRand(6))
	refTable := int64(binary.BigEndian.Uint64(m.b[48:]))
	block := int64(binary.BigEndian.Uint64(m.b[refTable:]))
	if got := binary.BigEndian.Uint16(m.b[block:]); got != 1 {
		t.Fatalf("header refcount: got %d, want 1", got)
	}
	binary.BigEndian.PutUint16(m.b[block:], 0)
	img := filepath.Join(t.TempDir(), "bad.qcow2")
	if err := os.WriteFile(img, m.b, 0o644); err != nil {
		t.Fatal(err)
	}
	p := testutil.NeedTool(t, "qemu-img")[0]
	out, err := exec.Command(p, "check", img).CombinedOutput()
	if err == nil {
		t.Fatalf("qemu-img check accepted an image with a zero header refcount:\n%s", out)
	}
}

// TestHugeSparse writes a few clusters into a 1 TiB disk.
func TestHugeSparse(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	const size = 1 << 40
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	rawPath := filepath.Join(dir, "raw.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.Create(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := raw.Truncate(size); err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(f, size, Options{})
	if err != nil {
		t.Fatal(err)
	}
	rng := newRand(77)
	offs := []int64{0, 1<<30 + 12345, 700<<30 + 3, size - 70000}
	for _, off := range offs {
		chunk := pattern(rng, 70000, 1<<16)
		chunk[0] = 1
		if _, err := w.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
		if _, err := raw.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	raw.Close()
	qemuImg(t, "check", img)
	qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", img, rawPath)
	var info qemuInfo
	if err := json.Unmarshal(qemuImg(t, "info", "--output=json", img), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size {
		t.Errorf("virtual size: got %d, want %d", info.VirtualSize, size)
	}
	if st := w.Stats(); st.FileSize > 2<<20 {
		t.Errorf("file size %d, want under 2 MiB for a sparse disk", st.FileSize)
	}
}
