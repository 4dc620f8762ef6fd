package ext4

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"github.com/nixvm-image/nixvm-image/testkit/vmtest"
)

// TestOnlineGrowth grows a mounted image to 64x its size with
// EXT4_IOC_RESIZE_FS in a QEMU guest (the kernel converts it to meta_bg, as
// it has no resize_inode), then checks it with e2fsck on the host.
func TestOnlineGrowth(t *testing.T) {
	testutil.Short(t)
	tools := testutil.NeedTool(t, "qemu-system-x86_64", "busybox", "go", "dumpe2fs")
	kernel, rel := vmtest.Kernel(t)
	mods, err := vmtest.Modules(filepath.Join("/lib/modules", rel), "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	growfs := filepath.Join(dir, "growfs")
	build := exec.Command(tools[2], "build", "-o", growfs, "./testdata/growfs")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build growfs: %v\n%s", err, out)
	}
	const size = 128 << 20
	tree := sampleTree(200, false)
	img, _ := mustBuild(t, tree, testOpts(size))
	if err := os.Truncate(img, 64*size); err != nil {
		t.Fatal(err)
	}
	newBlocks := 64 * size / blockSize
	script := fmt.Sprintf(`mount -t ext4 /dev/vda /mnt; echo "@@mount $?"
/bin/growfs /mnt %d; echo "@@grow $?"
echo "@@blocks $(df -k /mnt | tail -1 | awk '{print $2}')"
cat /mnt/etc/small >/dev/null; echo "@@read $?"
echo hello > /mnt/after-grow; sync
umount /mnt; echo "@@umount $?"
`, newBlocks)
	initrd := vmtest.Initramfs(t, vmtest.InitramfsConfig{Modules: mods, Script: script, Files: []vmtest.File{{Path: "bin/growfs", HostPath: growfs}}})
	t0 := time.Now()
	out, err := vmtest.Run(context.Background(), vmtest.Config{Kernel: kernel, Initrd: initrd, Disks: []vmtest.Disk{{Path: img}}}, 4*time.Minute)
	t.Logf("guest took %s", time.Since(t0))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, k := range []string{"mount", "grow", "read", "umount"} {
		if got := vmtest.Markers(out, k); len(got) != 1 || got[0] != "0" {
			t.Fatalf("guest step %s: got %q, want 0\n%s", k, got, out)
		}
	}
	e2fsck(t, img)
	dump, err := exec.Command(tools[3], "-h", img).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs: %v\n%s", err, dump)
	}
	if want := fmt.Sprintf("Block count:              %d\n", newBlocks); !strings.Contains(string(dump), want) {
		t.Fatalf("dumpe2fs -h: want %q in\n%s", want, dump)
	}
	t.Logf("guest df: %v KiB; features: %s", vmtest.Markers(out, "blocks"), grepLine(string(dump), "Filesystem features"))
}

func grepLine(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}
