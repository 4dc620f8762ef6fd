package ondisk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestE2fsprogs checks every structure and checksum of this package against
// file systems that mke2fs and e2fsck made: the superblock's fields against
// dumpe2fs, and the checksums of the superblock, each group descriptor,
// each inode in use, each extent tree block and each directory block (leaf
// tails, htree roots and interior nodes) against what e2fsprogs stored.
func TestE2fsprogs(t *testing.T) {
	tools := testutil.NeedTool(t, "mkfs.ext4", "e2fsck", "dumpe2fs")
	for _, c := range []struct {
		name string
		args []string
	}{
		{"4k-64bit", []string{"-b", "4096", "-O", "64bit,metadata_csum"}},
		{"1k-32bit", []string{"-b", "1024", "-O", "^64bit,metadata_csum"}},
		{"csum-seed", []string{"-b", "4096", "-O", "64bit,metadata_csum,metadata_csum_seed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := e2fsImage(t, tools, c.args)
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			s := checkSuper(t, f, tools[2], img)
			seen := checkGroups(t, f, s)
			t.Logf("%+v", seen)
			if seen.inodes < 700 || seen.treeBlocks == 0 || seen.dxRoots == 0 || seen.leaves < 40 {
				t.Errorf("checked %+v: the image lacks what the test is for", seen)
			}
			if c.name == "1k-32bit" && seen.dxNodes == 0 {
				t.Errorf("no htree interior node checked")
			}
		})
	}
}

// e2fsImage makes a 64 MiB file system holding a directory of 700 long
// entries (hash-indexed by e2fsck -D) and a file of 12 extents.
func e2fsImage(t *testing.T, tools, args []string) string {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	big := filepath.Join(src, "big")
	if err := os.MkdirAll(big, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 700 {
		if err := os.WriteFile(filepath.Join(big, fmt.Sprintf("%05d-%s", i, strings.Repeat("f", 240))), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sparse, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 12 {
		if _, err := sparse.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := sparse.Close(); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "fs.img")
	mkfs := append([]string{"-q", "-F", "-d", src}, args...)
	if out, err := exec.Command(tools[0], append(mkfs, img, "64M")...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %v: %v\n%s", mkfs, err, out)
	}
	// -D indexes the big directory; exit 1 means "fixed", which it is.
	if out, err := exec.Command(tools[1], "-fyD", img).CombinedOutput(); err != nil && !strings.Contains(err.Error(), "exit status 1") {
		t.Fatalf("e2fsck -fyD: %v\n%s", err, out)
	}
	if out, err := exec.Command(tools[1], "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	return img
}

func checkSuper(t *testing.T, f *os.File, dumpe2fs, img string) *Superblock {
	raw := make([]byte, SuperblockSize)
	if _, err := f.ReadAt(raw, SuperblockOffset); err != nil {
		t.Fatal(err)
	}
	s, err := ParseSuperblock(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.Marshal(), raw) {
		t.Error("Marshal of the parsed superblock differs from mke2fs's bytes (checksum or a field)")
	}
	out, err := exec.Command(dumpe2fs, "-h", img).Output()
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, l := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	for k, v := range map[string]uint64{
		"Inode count": uint64(s.InodesCount), "Block count": s.BlocksCount, "Free blocks": s.FreeBlocksCount,
		"Free inodes": uint64(s.FreeInodesCount), "First block": uint64(s.FirstDataBlock), "Block size": uint64(s.BlockSize()),
		"Blocks per group": uint64(s.BlocksPerGroup), "Inodes per group": uint64(s.InodesPerGroup),
		"Inode size": uint64(s.InodeSize), "Journal inode": uint64(s.JournalInum),
	} {
		if got, err := strconv.ParseUint(fields[k], 10, 64); err != nil || got != v {
			t.Errorf("%s: dumpe2fs says %q, we read %d", k, fields[k], v)
		}
	}
	if got := fmt.Sprintf("0x%08x", s.Checksum); fields["Checksum"] != got {
		t.Errorf("checksum: dumpe2fs says %q, we read %s", fields["Checksum"], got)
	}
	if want := fields["Checksum seed"]; want != "" && want != fmt.Sprintf("0x%08x", s.CsumSeed()) {
		t.Errorf("checksum seed: dumpe2fs says %q, we have %#08x", want, s.CsumSeed())
	}
	return s
}

type checked struct{ groups, inodes, treeBlocks, dxRoots, dxNodes, leaves int }

func checkGroups(t *testing.T, f *os.File, s *Superblock) checked {
	var c checked
	seed := s.CsumSeed()
	for g := range uint32(s.Groups()) {
		d, err := ReadGroupDesc(f, s, g)
		if err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, s.GroupDescSize())
		f.ReadAt(raw, s.GroupDescOffset(g))
		if got := GroupDescChecksum(seed, g, raw); got != d.Checksum {
			t.Errorf("group %d: descriptor checksum got %#04x, stored %#04x", g, got, d.Checksum)
		}
		c.groups++
		if d.Flags&BGInodeUninit != 0 {
			continue
		}
		table := make([]byte, int(s.InodesPerGroup)*int(s.InodeSize))
		if _, err := f.ReadAt(table, int64(d.InodeTable)*s.BlockSize()); err != nil {
			t.Fatal(err)
		}
		for i := range s.InodesPerGroup {
			in := table[int(i)*int(s.InodeSize):][:s.InodeSize]
			if binary.LittleEndian.Uint16(in[InodeMode:]) == 0 {
				continue
			}
			checkInode(t, f, s, in, g*s.InodesPerGroup+i+1, &c)
		}
	}
	return c
}

func checkInode(t *testing.T, f *os.File, s *Superblock, in []byte, ino uint32, c *checked) {
	le := binary.LittleEndian
	c.inodes++
	want := bytes.Clone(in)
	SetInodeChecksum(in, s.CsumSeed(), ino)
	if !bytes.Equal(in, want) {
		t.Errorf("inode %d: checksum differs from e2fsprogs'", ino)
	}
	flags := le.Uint32(in[InodeFlags:])
	if flags&InodeFlagExtents == 0 {
		return
	}
	seed := InodeSeed(s.CsumSeed(), ino, le.Uint32(in[InodeGeneration:]))
	read := func(n uint64) ([]byte, error) {
		b := make([]byte, s.BlockSize())
		_, err := f.ReadAt(b, int64(n)*s.BlockSize())
		return b, err
	}
	isDir := le.Uint16(in[InodeMode:])&ModeTypeMask == ModeDir
	w := ExtentWalk{Read: read}
	w.Node = func(n uint64, _ int, b []byte) error {
		c.treeBlocks++
		return checkSame(t, fmt.Sprintf("inode %d extent block %d", ino, n), b, func(b []byte) error { return SetExtentChecksum(b, seed) })
	}
	w.Extent = func(e Extent) error {
		for k := range e.Blocks() {
			if !isDir {
				break
			}
			b, err := read(e.Start + k)
			if err != nil {
				return err
			}
			checkDirBlock(t, b, uint64(e.Logical)+k, flags&InodeFlagIndex != 0, seed, c)
		}
		return nil
	}
	if err := w.Walk(in[InodeBlock : InodeBlock+InodeBlockSize]); err != nil {
		t.Errorf("inode %d: %v", ino, err)
	}
}

func checkDirBlock(t *testing.T, b []byte, lblk uint64, indexed bool, seed uint32, c *checked) {
	le := binary.LittleEndian
	what := fmt.Sprintf("directory block %d", lblk)
	switch {
	case indexed && lblk == 0:
		c.dxRoots++
		checkSame(t, what, b, func(b []byte) error { return SetDxChecksum(b, DxRootCountOffset(b), seed) })
	case indexed && le.Uint32(b) == 0 && int(le.Uint16(b[4:])) == len(b):
		c.dxNodes++
		checkSame(t, what, b, func(b []byte) error { return SetDxChecksum(b, 8, seed) })
	default:
		c.leaves++
		if !HasDirTail(b) {
			t.Errorf("%s: no checksum tail", what)
		}
		checkSame(t, what, b, func(b []byte) error { PutDirTail(b, seed); return nil })
	}
}

// checkSame recomputes a checksum in a copy of b: the copy must equal b.
func checkSame(t *testing.T, what string, b []byte, set func([]byte) error) error {
	got := bytes.Clone(b)
	if err := set(got); err != nil {
		t.Errorf("%s: %v", what, err)
		return nil
	}
	if !bytes.Equal(got, b) {
		t.Errorf("%s: checksum differs from e2fsprogs'", what)
	}
	return nil
}
