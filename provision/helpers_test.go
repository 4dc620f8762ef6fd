package provision

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// testImage returns size bytes of random 4 KiB blocks with holes: every
// fourth 64 KiB stretch zero, and the last MiB zero.
func testImage(seed int64, size int) []byte {
	b := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(b)
	for off := 0; off < size; off += 256 << 10 {
		clear(b[off:min(off+64<<10, size)])
	}
	clear(b[max(0, size-1<<20):])
	return b
}

// putGen stores data as the new current generation of name in st, as a
// push would, and returns it.
func putGen(t testing.TB, st *store.Store, name string, data []byte) store.Generation {
	t.Helper()
	h := manifest.NewHasher(int64(len(data)), 0)
	if _, err := h.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	m, err := h.Finish()
	if err != nil {
		t.Fatal(err)
	}
	g, err := st.Put(name, bytes.NewReader(data), m)
	if err != nil {
		t.Fatal(err)
	}
	// Generations are ordered by mtime; make the order certain on fast machines.
	time.Sleep(20 * time.Millisecond)
	return g
}

func newStore(t testing.TB) *store.Store {
	return &store.Store{Dir: filepath.Join(t.TempDir(), "images")}
}

// keptBy maps the generations gc kept to why.
func keptBy(ds []store.Decision) map[string]string {
	kept := map[string]string{}
	for _, d := range ds {
		if !d.Remove {
			kept[d.Gen.Path] = d.Reason
		}
	}
	return kept
}

// run runs a tool and returns its stdout, failing the test on error.
func run(t testing.TB, argv ...string) string {
	t.Helper()
	out, err := ExecRunner(context.Background(), argv)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// compareWithBase runs qemu-img compare of disk (format fmt, "raw" or
// "qcow2", or an --image-opts string when it contains '=') against the
// base generation. qemu-img compare (non-strict) requires the area past the
// smaller image's end to read as zeros, so this checks the base's data and
// that nothing else is there.
func compareWithBase(t testing.TB, disk, format, base string) {
	t.Helper()
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	var argv []string
	if strings.Contains(disk, "=") {
		argv = []string{qimg, "compare", "--image-opts", disk, "driver=qcow2,file.filename=" + base}
	} else {
		argv = []string{qimg, "compare", "-f", format, "-F", "qcow2", disk, base}
	}
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

func fileHash(t testing.TB, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// allocated returns the bytes a file occupies on disk.
func allocated(t testing.TB, p string) int64 {
	t.Helper()
	var st syscallStat
	if err := statFile(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func writeRandom(t testing.TB, p string, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.New(rand.NewSource(int64(n))).Read(b)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

func mustEqualFile(t testing.TB, p string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s changed: got %d bytes (sha %x), want the %d bytes it had", p, len(got), sha256.Sum256(got), len(want))
	}
}

func fmtSize(n int64) string { return fmt.Sprint(n) }
