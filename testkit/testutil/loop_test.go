package testutil

import (
	"os"
	"path/filepath"
	"testing"
)

// TestAttachLoopMount makes an ext4 inside a file at an offset, as a
// partition would be, through a loop device, mounts it, writes a file, and
// checks after the cleanups that the data landed at the offset and that the
// device is gone.
func TestAttachLoopMount(t *testing.T) {
	NeedRoot(t)
	mkfs := NeedTool(t, "mkfs.ext4")[0]
	img := filepath.Join(t.TempDir(), "disk.img")
	const offset, size = 1 << 20, 8 << 20
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, offset+size+(1<<20)); err != nil {
		t.Fatal(err)
	}
	var dev string
	t.Run("mount", func(t *testing.T) {
		dev = AttachLoop(t, img, offset, size)
		if _, err := runTool(mkfs, "-q", "-F", dev); err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		Mount(t, dev, dir, "rw", "noatime")
		if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("hello\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if t.Failed() {
		return
	}
	// The ext4 superblock magic 0xEF53 sits 1024+56 bytes into the filesystem.
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, offset+1024+56); err != nil {
		t.Fatal(err)
	}
	if magic[0] != 0x53 || magic[1] != 0xef {
		t.Errorf("no ext4 magic at the offset: got %x, want 53ef", magic)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file"); err == nil {
		t.Errorf("%s still attached to %s after the test", dev, b)
	}
}
