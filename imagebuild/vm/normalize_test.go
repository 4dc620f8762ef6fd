package vm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestNormalize changes a file system the way a kernel does (times of now,
// random generations, a new directory and file) with debugfs, then restores
// it: e2fsck finds it clean, times are the epoch, generations 0, and the
// superblock and journal are back.
func TestNormalize(t *testing.T) {
	tools := testutil.NeedTool(t, "debugfs", "e2fsck")
	debugfs, e2fsck := tools[0], tools[1]
	disk, plan := testDisk(t)
	part := filepath.Join(t.TempDir(), "part.img")
	copyRange(t, disk, part, plan.Root.Start, plan.Root.Size)
	f, err := os.OpenFile(part, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	snap, err := snapshotExt4(f, 0)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(part)

	script := filepath.Join(t.TempDir(), "cmds")
	var cmds strings.Builder
	cfgFile := filepath.Join(t.TempDir(), "grub.cfg")
	os.WriteFile(cfgFile, bytes.Repeat([]byte("menuentry\n"), 1000), 0o644)
	cmds.WriteString("mkdir /boot\nmkdir /boot/grub\ncd /boot/grub\nwrite " + cfgFile + " grub.cfg\ncd /\n")
	// Children first: a directory's new generation breaks lookups in it.
	for _, p := range []string{"/boot/grub/grub.cfg", "/boot/grub", "/boot", "/nix"} {
		cmds.WriteString("sif " + p + " generation 0x5eed1234\n")
		cmds.WriteString("sif " + p + " mtime 1700000000\nsif " + p + " ctime 1700000001\nsif " + p + " crtime 1700000002\n")
	}
	cmds.WriteString("ssv mtime 1700000003\nssv wtime 1700000004\nssv mnt_count 7\nssv kbytes_written 99\n")
	os.WriteFile(script, []byte(cmds.String()), 0o644)
	if out, err := exec.Command(debugfs, "-w", "-f", script, part).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	// debugfs changed the generations without the directory block
	// checksums they seed (the kernel would have written both).
	if out, err := exec.Command(e2fsck, "-fn", part).CombinedOutput(); err == nil || !strings.Contains(string(out), "fails checksum") {
		t.Fatalf("e2fsck after debugfs (test setup): got %v, want directory checksum errors\n%s", err, out)
	}
	st, err := snap.restore(f, 1)
	if err != nil {
		t.Fatal(err)
	}
	if st.Inodes < 4 || st.Generations != 4 || !st.Journal || !st.SuperChanged {
		t.Errorf("stats: got %+v, want >= 4 inodes, 4 generations, journal and superblock restored", st)
	}
	if out, err := exec.Command(e2fsck, "-fn", part).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after restore: %v\n%s", err, out)
	}
	for _, p := range []string{"/boot", "/boot/grub/grub.cfg", "/nix"} {
		out, err := exec.Command(debugfs, "-R", "stat "+p, part).Output()
		if err != nil {
			t.Fatal(err)
		}
		s := string(out)
		for _, w := range []string{"Generation: 0 ", "ctime: 0x00000001:00000000", "mtime: 0x00000001:00000000", "crtime: 0x00000001:00000000"} {
			if !strings.Contains(s, w) {
				t.Errorf("%s: stat lacks %q:\n%s", p, w, s)
			}
		}
	}
	after, _ := os.ReadFile(part)
	if !bytes.Equal(after[1024:2048], before[1024:2048]) {
		// debugfs allocated blocks and inodes: the counts differ, the times
		// must not.
		// s_mtime, s_wtime, s_mnt_count, s_kbytes_written
		for _, off := range []int{0x2C, 0x30, 0x34, 0x178} {
			if after[1024+off] != before[1024+off] {
				t.Errorf("superblock field at %#x not restored", off)
			}
		}
	}
	// A second restore changes nothing.
	if st, err := snap.restore(f, 1); err != nil || st.Inodes != 0 || st.Generations != 0 {
		t.Errorf("second restore: got %+v, %v, want nothing to do", st, err)
	}
}

// TestInodeChecksum checks our inode checksum against the ones our ext4
// writer (itself checked by e2fsck) stores.
func TestInodeChecksum(t *testing.T) {
	disk, plan := testDisk(t)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fs, err := openExt4(f, nil, plan.Root.Start)
	if err != nil {
		t.Fatal(err)
	}
	if !fs.sb.MetadataCsum() {
		t.Fatal("the image has no metadata_csum, which our ext4 writer always sets: nothing here would be checked")
	}
	for _, ino := range []uint32{2, 11, 12} {
		in, err := fs.readInode(ino)
		if err != nil {
			t.Fatal(err)
		}
		got := append([]byte(nil), in...)
		ondisk.SetInodeChecksum(got, fs.seed, ino)
		if !bytes.Equal(got, in) {
			t.Errorf("inode %d: checksum differs from the writer's", ino)
		}
	}
}
