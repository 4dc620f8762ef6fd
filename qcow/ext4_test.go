package qcow

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestExt4Image converts a real file system image (mkfs.ext4 -d of
// /usr/share/doc, a mix of text and gzip files) with CopySparse, checks it
// with qemu-img and compares its size with qemu-img convert -c.
func TestExt4Image(t *testing.T) {
	testutil.Short(t)
	tools := testutil.NeedTool(t, "mkfs.ext4", "qemu-img")
	const src = "/usr/share/doc"
	if _, err := os.Stat(src); err != nil {
		testutil.Skip(t, "%s missing: %v", src, err)
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "fs.raw")
	const size = 512 << 20
	mkfs := exec.Command(tools[0], "-q", "-F", "-d", src, "-E", "root_owner=0:0", raw, "512M")
	if out, err := mkfs.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", mkfs.Args, err, out)
	}
	for _, c := range []Compression{Zstd, Zlib} {
		t.Run(c.String(), func(t *testing.T) {
			img := filepath.Join(dir, "ours-"+c.String()+".qcow2")
			f, err := os.Open(raw)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			out, err := os.Create(img)
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			start := time.Now()
			w, err := NewWriter(out, size, Options{Compression: c})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := CopySparse(w, f, size); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			ours := time.Since(start)
			qemuImg(t, "check", img)
			qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", img, raw)

			ref := filepath.Join(dir, "qemu-"+c.String()+".qcow2")
			start = time.Now()
			qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type="+c.String(), raw, ref)
			theirs := time.Since(start)
			fi, _ := os.Stat(ref)
			st := w.Stats()
			t.Logf("%s: ours %d bytes in %v (%d compressed, %d raw, %d pack clusters); qemu-img convert -c: %d bytes in %v",
				c, st.FileSize, ours.Round(time.Millisecond), st.CompressedClusters, st.RawClusters, st.PackClusters, fi.Size(), theirs.Round(time.Millisecond))
			if float64(st.FileSize) > 1.03*float64(fi.Size()) {
				t.Errorf("%s: our image is %d bytes, more than 3%% above qemu-img's %d", c, st.FileSize, fi.Size())
			}
		})
	}
}
