package vm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
)

// The guest writes into the root file system through the Linux kernel, which
// stamps what it writes with the guest's clock and journals it with its own
// timing. These bytes would make two builds of the same closure differ, so
// the stage puts them back the way a reproducible archive does
// (SOURCE_DATE_EPOCH clamping):
//
//   - every inode timestamp later than the epoch is clamped to the epoch
//     (atime, ctime, mtime, dtime, crtime; nanoseconds cleared), and the
//     inode checksum recomputed;
//   - every inode generation (random in the kernel) is reset to 0, and the
//     checksums it seeds (extent tree blocks, directory blocks) recomputed;
//   - the superblock's mount and write times, mount count and lifetime
//     kilobytes written are restored to their values before the VM, and its
//     checksum recomputed;
//   - the journal, clean after the guest's unmount, is restored to its
//     bytes before the VM (an empty journal: the transactions it held are
//     all checkpointed).
//
// The on-disk structures and checksums are ext4/ondisk's (the kernel's
// Documentation/filesystems/ext4); the jbd2 superblock's fields are the
// kernel's include/linux/jbd2.h.

// ErrExt4 reports a root file system the stage cannot normalise.
var ErrExt4 = errors.New("vm: normalise the root file system")

type readerWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// jbd2 superblock: s_start, the first block of the log; 0 when the journal
// is clean.
const jbd2Start = 0x1C

// ext4FS is the ext4 file system at a byte offset of a disk.
type ext4FS struct {
	r    io.ReaderAt // the file system, from its first byte
	w    io.WriterAt // likewise; nil when only reading
	sb   *ondisk.Superblock
	raw  []byte // the superblock's bytes as read
	bs   int64  // block size
	seed uint32 // metadata_csum seed
}

// openExt4 reads the superblock of the file system at byte off of disk.
// w, if not nil, is the same disk, for writing.
func openExt4(disk io.ReaderAt, w io.WriterAt, off int64) (*ext4FS, error) {
	fs := &ext4FS{r: io.NewSectionReader(disk, off, math.MaxInt64-off), raw: make([]byte, ondisk.SuperblockSize)}
	if w != nil {
		fs.w = io.NewOffsetWriter(w, off)
	}
	if _, err := fs.r.ReadAt(fs.raw, ondisk.SuperblockOffset); err != nil {
		return nil, fmt.Errorf("%w: read the superblock: %w", ErrExt4, err)
	}
	sb, err := ondisk.ParseSuperblock(fs.raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrExt4, err)
	}
	if sb.BlocksPerGroup == 0 || sb.InodesPerGroup == 0 || sb.InodeSize < ondisk.GoodOldInodeSize || sb.GroupDescSize() < 32 {
		return nil, fmt.Errorf("%w: implausible superblock", ErrExt4)
	}
	fs.sb, fs.bs, fs.seed = sb, sb.BlockSize(), sb.CsumSeed()
	return fs, nil
}

// group returns the descriptor of group i.
func (fs *ext4FS) group(i uint32) (ondisk.GroupDesc, error) {
	d, err := ondisk.ReadGroupDesc(fs.r, fs.sb, i)
	if err != nil {
		return d, fmt.Errorf("%w: %w", ErrExt4, err)
	}
	return d, nil
}

// readInode returns the bytes of inode ino.
func (fs *ext4FS) readInode(ino uint32) ([]byte, error) {
	ipg := fs.sb.InodesPerGroup
	d, err := fs.group((ino - 1) / ipg)
	if err != nil {
		return nil, err
	}
	b := make([]byte, fs.sb.InodeSize)
	at := int64(d.InodeTable)*fs.bs + int64((ino-1)%ipg)*int64(len(b))
	if _, err := fs.r.ReadAt(b, at); err != nil {
		return nil, fmt.Errorf("%w: read inode %d: %w", ErrExt4, ino, err)
	}
	return b, nil
}

// extent is a run of a file: its first logical block, and its byte offset
// and length in the file system.
type extent struct{ lblk, off, len int64 }

// extents returns the runs that the extent tree of inode ino maps (root:
// the inode's i_block), calling node, if not nil, for every tree block
// below the root with its number and bytes (node may change them and write
// them back).
func (fs *ext4FS) extents(ino uint32, root []byte, node func(n uint64, b []byte) error) ([]extent, error) {
	var out []extent
	w := ondisk.ExtentWalk{
		Read: func(n uint64) ([]byte, error) {
			b := make([]byte, fs.bs)
			if _, err := fs.r.ReadAt(b, int64(n)*fs.bs); err != nil {
				return nil, fmt.Errorf("%w: read extent block %d: %w", ErrExt4, n, err)
			}
			return b, nil
		},
		Extent: func(e ondisk.Extent) error {
			out = append(out, extent{int64(e.Logical), int64(e.Start) * fs.bs, int64(e.Blocks()) * fs.bs})
			return nil
		},
	}
	if node != nil {
		w.Node = func(n uint64, _ int, b []byte) error { return node(n, b) }
	}
	if err := w.Walk(root); err != nil {
		if errors.Is(err, ondisk.ErrCorrupt) {
			return nil, fmt.Errorf("%w: inode %d: %w", ErrExt4, ino, err)
		}
		return nil, err
	}
	return out, nil
}

// ext4Snapshot is what the guest must not change for good.
type ext4Snapshot struct {
	off     int64 // the partition's offset on the disk
	sb      *ondisk.Superblock
	journal []extent // where the journal is
	jdata   [][]byte // and what it holds
}

// snapshotExt4 records the superblock and the journal of the ext4 file
// system at offset off of disk.
func snapshotExt4(disk io.ReaderAt, off int64) (*ext4Snapshot, error) {
	fs, err := openExt4(disk, nil, off)
	if err != nil {
		return nil, err
	}
	s := &ext4Snapshot{off: off, sb: fs.sb}
	jino := fs.sb.JournalInum
	if jino == 0 {
		return s, nil
	}
	inode, err := fs.readInode(jino)
	if err != nil {
		return nil, err
	}
	if s.journal, err = fs.extents(jino, iblock(inode), nil); err != nil {
		return nil, err
	}
	for _, e := range s.journal {
		b := make([]byte, e.len)
		if _, err := fs.r.ReadAt(b, e.off); err != nil {
			return nil, fmt.Errorf("%w: read the journal: %w", ErrExt4, err)
		}
		s.jdata = append(s.jdata, b)
	}
	return s, nil
}

func iblock(inode []byte) []byte {
	return inode[ondisk.InodeBlock : ondisk.InodeBlock+ondisk.InodeBlockSize]
}

// normalizeStats counts what restore changed.
type normalizeStats struct {
	Inodes       int  // inodes whose timestamps were clamped
	Generations  int  // inodes whose generation was reset
	Journal      bool // the journal was restored
	SuperChanged bool
}

// restore clamps inode timestamps to epoch, resets inode generations and
// restores the superblock fields and the journal recorded by the snapshot.
func (s *ext4Snapshot) restore(disk readerWriterAt, epoch int64) (*normalizeStats, error) {
	fs, err := openExt4(disk, disk, s.off)
	if err != nil {
		return nil, err
	}
	if state := fs.sb.State; state&1 == 0 {
		return nil, fmt.Errorf("%w: the guest did not unmount it cleanly (s_state %#x)", ErrExt4, state)
	}
	st := &normalizeStats{}
	if err := fs.normalizeInodes(epoch, st); err != nil {
		return nil, err
	}
	if err := s.restoreJournal(fs, st); err != nil {
		return nil, err
	}
	if err := s.restoreSuper(fs, st); err != nil {
		return nil, err
	}
	return st, nil
}

// normalizeInodes normalises the inodes of every group whose inode table is
// initialised.
func (fs *ext4FS) normalizeInodes(epoch int64, st *normalizeStats) error {
	table := make([]byte, int64(fs.sb.InodesPerGroup)*int64(fs.sb.InodeSize))
	for grp := range uint32(fs.sb.Groups()) {
		d, err := fs.group(grp)
		if err != nil {
			return err
		}
		if d.Flags&ondisk.BGInodeUninit != 0 {
			continue
		}
		at := int64(d.InodeTable) * fs.bs
		if _, err := fs.r.ReadAt(table, at); err != nil {
			return fmt.Errorf("%w: read the inode table of group %d: %w", ErrExt4, grp, err)
		}
		dirty := false
		size := int(fs.sb.InodeSize)
		for i := range fs.sb.InodesPerGroup {
			changed, err := fs.normalizeInode(table[int(i)*size:int(i+1)*size], grp*fs.sb.InodesPerGroup+i+1, epoch, st)
			if err != nil {
				return err
			}
			dirty = dirty || changed
		}
		if dirty {
			if _, err := fs.w.WriteAt(table, at); err != nil {
				return fmt.Errorf("%w: write the inode table of group %d: %w", ErrExt4, grp, err)
			}
		}
	}
	return nil
}

// normalizeInode clamps the times of inode ino (its bytes in) and resets
// its generation, and reports whether it changed it.
func (fs *ext4FS) normalizeInode(in []byte, ino uint32, epoch int64, st *normalizeStats) (bool, error) {
	le := binary.LittleEndian
	changed := clampInode(in, epoch)
	if changed {
		st.Inodes++
	}
	if le.Uint32(in[ondisk.InodeGeneration:]) != 0 {
		// The kernel gives new inodes a random generation, which seeds
		// the checksums of the inode's metadata blocks.
		le.PutUint32(in[ondisk.InodeGeneration:], 0)
		if fs.sb.MetadataCsum() {
			if err := fs.fixBlockChecksums(in, ino); err != nil {
				return false, err
			}
		}
		st.Generations++
		changed = true
	}
	if changed && fs.sb.MetadataCsum() {
		ondisk.SetInodeChecksum(in, fs.seed, ino)
	}
	return changed, nil
}

// restoreJournal writes back the journal's bytes from before the VM.
// After the guest's clean unmount the journal is empty (s_start == 0), so
// its old bytes are as good as any.
func (s *ext4Snapshot) restoreJournal(fs *ext4FS, st *normalizeStats) error {
	if len(s.journal) == 0 {
		return nil
	}
	jsb := make([]byte, 1024)
	if _, err := fs.r.ReadAt(jsb, s.journal[0].off); err != nil {
		return fmt.Errorf("%w: read the journal superblock: %w", ErrExt4, err)
	}
	if binary.BigEndian.Uint32(jsb) != ondisk.JournalMagic {
		return fmt.Errorf("%w: no jbd2 superblock at the journal's start", ErrExt4)
	}
	if binary.BigEndian.Uint32(jsb[jbd2Start:]) != 0 {
		return fmt.Errorf("%w: the journal needs recovery: the guest did not unmount cleanly", ErrExt4)
	}
	for i, e := range s.journal {
		if _, err := fs.w.WriteAt(s.jdata[i], e.off); err != nil {
			return fmt.Errorf("%w: restore the journal: %w", ErrExt4, err)
		}
	}
	st.Journal = true
	return nil
}

// restoreSuper puts back the superblock's mount and write times, mount
// count and kilobytes written from before the VM.
func (s *ext4Snapshot) restoreSuper(fs *ext4FS, st *normalizeStats) error {
	sb, old := fs.sb, s.sb
	sb.Mtime, sb.MtimeHi, sb.Wtime, sb.WtimeHi = old.Mtime, old.MtimeHi, old.Wtime, old.WtimeHi
	sb.MntCount, sb.KbytesWritten = old.MntCount, old.KbytesWritten
	b := sb.Marshal()
	if bytes.Equal(b, fs.raw) {
		return nil
	}
	st.SuperChanged = true
	if _, err := fs.w.WriteAt(b, ondisk.SuperblockOffset); err != nil {
		return fmt.Errorf("%w: write the superblock: %w", ErrExt4, err)
	}
	return nil
}

// Timestamp fields of an inode: the 32-bit seconds and, when present in the
// extra space, the field holding nanoseconds and epoch bits (-1: none).
var inodeTimes = []struct{ sec, extra int }{
	{0x08, 0x8C}, // atime
	{0x0C, 0x84}, // ctime
	{0x10, 0x88}, // mtime
	{0x14, -1},   // dtime
	{0x90, 0x94}, // crtime (extra space)
}

// clampInode clamps the inode's timestamps to epoch and reports whether it
// changed anything.
func clampInode(in []byte, epoch int64) bool {
	le := binary.LittleEndian
	const old = ondisk.GoodOldInodeSize
	extraEnd := old
	if len(in) > old {
		extraEnd = old + int(le.Uint16(in[ondisk.InodeExtraIsize:]))
	}
	changed := false
	for _, f := range inodeTimes {
		if f.sec+4 > old && f.sec+4 > extraEnd {
			continue
		}
		sec := int64(int32(le.Uint32(in[f.sec:])))
		var extra uint32
		hasExtra := f.extra >= 0 && f.extra+4 <= extraEnd
		if hasExtra {
			extra = le.Uint32(in[f.extra:])
			sec += int64(extra&3) << 32
		}
		if sec > epoch || (sec == epoch && extra != 0 && hasExtra) {
			le.PutUint32(in[f.sec:], uint32(epoch))
			if hasExtra {
				le.PutUint32(in[f.extra:], uint32((epoch>>32)&3))
			}
			changed = true
		}
	}
	return changed
}

// fixBlockChecksums recomputes the checksums of the inode's extent tree
// blocks and, for a directory, of its leaf blocks (dirent tail) and htree
// nodes (dx tail), which the inode's generation seeds.
func (fs *ext4FS) fixBlockChecksums(in []byte, ino uint32) error {
	le := binary.LittleEndian
	flags := le.Uint32(in[ondisk.InodeFlags:])
	if flags&ondisk.InodeFlagExtents == 0 { // inline data or block maps, untouched here
		if le.Uint16(in[0x1A:]) != 0 && flags&ondisk.InodeFlagInlineData == 0 && le.Uint32(in[ondisk.InodeBlock:]) != 0 {
			return fmt.Errorf("%w: inode %d uses block maps", ErrExt4, ino)
		}
		return nil
	}
	seed := ondisk.InodeSeed(fs.seed, ino, le.Uint32(in[ondisk.InodeGeneration:]))
	exts, err := fs.extents(ino, iblock(in), func(n uint64, b []byte) error {
		if err := ondisk.SetExtentChecksum(b, seed); err != nil {
			return fmt.Errorf("%w: inode %d: extent block %d: %w", ErrExt4, ino, n, err)
		}
		if _, err := fs.w.WriteAt(b, int64(n)*fs.bs); err != nil {
			return fmt.Errorf("%w: write extent block %d: %w", ErrExt4, n, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if le.Uint16(in[ondisk.InodeMode:])&ondisk.ModeTypeMask != ondisk.ModeDir {
		return nil
	}
	b := make([]byte, fs.bs)
	for _, e := range exts {
		for k := int64(0); k < e.len/fs.bs; k++ {
			at := e.off + k*fs.bs
			if _, err := fs.r.ReadAt(b, at); err != nil {
				return fmt.Errorf("%w: read directory block: %w", ErrExt4, err)
			}
			if err := fixDirBlock(b, e.lblk+k, flags&ondisk.InodeFlagIndex != 0, seed); err != nil {
				return fmt.Errorf("%w: inode %d: %w", ErrExt4, ino, err)
			}
			if _, err := fs.w.WriteAt(b, at); err != nil {
				return fmt.Errorf("%w: write directory block: %w", ErrExt4, err)
			}
		}
	}
	return nil
}

// fixDirBlock recomputes the checksum of directory block b (logical block
// lblk of a directory, hash-indexed or not): an htree root, an htree
// interior node (a fake entry of inode 0 spanning the block) or a leaf.
func fixDirBlock(b []byte, lblk int64, indexed bool, seed uint32) error {
	le := binary.LittleEndian
	switch {
	case indexed && lblk == 0:
		return ondisk.SetDxChecksum(b, ondisk.DxRootCountOffset(b), seed)
	case indexed && le.Uint32(b) == 0 && int(le.Uint16(b[4:])) == len(b):
		return ondisk.SetDxChecksum(b, 8, seed)
	case !ondisk.HasDirTail(b):
		return fmt.Errorf("directory block %d has no checksum tail", lblk)
	}
	ondisk.PutDirTail(b, seed)
	return nil
}
