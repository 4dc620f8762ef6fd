package vm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
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
//   - the superblock's mount and write times, mount count and lifetime
//     kilobytes written are restored to their values before the VM, and its
//     checksum recomputed;
//   - the journal, clean after the guest's unmount, is restored to its
//     bytes before the VM (an empty journal: the transactions it held are
//     all checkpointed).
//
// The layout follows the kernel's Documentation/filesystems/ext4 (on-disk
// superblock, group descriptors, inode table, extent tree, jbd2 superblock).

// ErrExt4 reports a root file system the stage cannot normalise.
var ErrExt4 = errors.New("vm: normalise the root file system")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the kernel's raw crc32c_le (no final inversion), which ext4
// chains: raw(c, p) = ^crc32.Update(^c, p).
func crc32c(c uint32, p []byte) uint32 { return ^crc32.Update(^c, castagnoli, p) }

type readerWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

type ext4Geometry struct {
	blockSize      int64
	inodeSize      int
	inodesPerGroup uint32
	groups         uint32
	descSize       int
	gdtStart       int64 // byte offset of the group descriptors
	csum           bool  // metadata_csum
	csumSeed       uint32
}

const (
	sbOffset        = 1024
	sbSize          = 1024
	sbMtime         = 0x2C
	sbWtime         = 0x30
	sbMntCount      = 0x34
	sbKbytesWritten = 0x178
	sbWtimeHi       = 0x274
	sbMtimeHi       = 0x275
	sbChecksum      = 0x3FC
)

func readGeometry(sb []byte) (*ext4Geometry, error) {
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != 0xEF53 {
		return nil, fmt.Errorf("%w: no ext4 superblock: got magic %#x, want 0xef53", ErrExt4, le.Uint16(sb[0x38:]))
	}
	g := &ext4Geometry{
		blockSize:      1024 << le.Uint32(sb[0x18:]),
		inodeSize:      int(le.Uint16(sb[0x58:])),
		inodesPerGroup: le.Uint32(sb[0x28:]),
	}
	blocks := uint64(le.Uint32(sb[0x4:]))
	incompat := le.Uint32(sb[0x60:])
	g.descSize = 32
	if incompat&0x80 != 0 { // 64bit
		blocks |= uint64(le.Uint32(sb[0x150:])) << 32
		g.descSize = int(le.Uint16(sb[0xFE:]))
	}
	first := uint64(le.Uint32(sb[0x14:]))
	perGroup := uint64(le.Uint32(sb[0x20:]))
	if perGroup == 0 || g.inodesPerGroup == 0 || g.inodeSize < 128 || g.descSize < 32 {
		return nil, fmt.Errorf("%w: implausible superblock", ErrExt4)
	}
	g.groups = uint32((blocks - first + perGroup - 1) / perGroup)
	g.gdtStart = int64(first+1) * g.blockSize
	g.csum = le.Uint32(sb[0x64:])&0x400 != 0
	if incompat&0x2000 != 0 { // csum_seed
		g.csumSeed = le.Uint32(sb[0x270:])
	} else {
		g.csumSeed = crc32c(^uint32(0), sb[0x68:0x78])
	}
	return g, nil
}

// ext4Snapshot is what the guest must not change for good.
type ext4Snapshot struct {
	off     int64 // the partition's offset on the disk
	sb      []byte
	journal []extent // byte ranges (relative to off) of the journal
	jdata   [][]byte
}

type extent struct{ lblk, off, len int64 }

// snapshotExt4 records the superblock and the journal of the ext4 file
// system at offset off of disk.
func snapshotExt4(disk io.ReaderAt, off int64) (*ext4Snapshot, error) {
	s := &ext4Snapshot{off: off, sb: make([]byte, sbSize)}
	if _, err := disk.ReadAt(s.sb, off+sbOffset); err != nil {
		return nil, fmt.Errorf("%w: read the superblock: %v", ErrExt4, err)
	}
	g, err := readGeometry(s.sb)
	if err != nil {
		return nil, err
	}
	jino := binary.LittleEndian.Uint32(s.sb[0xE0:])
	if jino == 0 {
		return s, nil
	}
	inode, _, err := g.readInode(disk, off, jino)
	if err != nil {
		return nil, err
	}
	if s.journal, err = g.extents(disk, off, inode[0x28:0x28+60], 0); err != nil {
		return nil, err
	}
	for _, e := range s.journal {
		b := make([]byte, e.len)
		if _, err := disk.ReadAt(b, off+e.off); err != nil {
			return nil, fmt.Errorf("%w: read the journal: %v", ErrExt4, err)
		}
		s.jdata = append(s.jdata, b)
	}
	return s, nil
}

// inodeLocation returns the byte offset (relative to the partition) of inode
// ino.
func (g *ext4Geometry) inodeLocation(disk io.ReaderAt, off int64, ino uint32) (int64, error) {
	group := (ino - 1) / g.inodesPerGroup
	table, _, err := g.group(disk, off, group)
	if err != nil {
		return 0, err
	}
	return table*g.blockSize + int64((ino-1)%g.inodesPerGroup)*int64(g.inodeSize), nil
}

func (g *ext4Geometry) readInode(disk io.ReaderAt, off int64, ino uint32) ([]byte, int64, error) {
	loc, err := g.inodeLocation(disk, off, ino)
	if err != nil {
		return nil, 0, err
	}
	b := make([]byte, g.inodeSize)
	if _, err := disk.ReadAt(b, off+loc); err != nil {
		return nil, 0, fmt.Errorf("%w: read inode %d: %v", ErrExt4, ino, err)
	}
	return b, loc, nil
}

// group returns the inode table's block and the flags of group i.
func (g *ext4Geometry) group(disk io.ReaderAt, off int64, i uint32) (table int64, flags uint16, err error) {
	d := make([]byte, g.descSize)
	if _, err := disk.ReadAt(d, off+g.gdtStart+int64(i)*int64(g.descSize)); err != nil {
		return 0, 0, fmt.Errorf("%w: read group descriptor %d: %v", ErrExt4, i, err)
	}
	le := binary.LittleEndian
	table = int64(le.Uint32(d[0x8:]))
	if g.descSize >= 64 {
		table |= int64(le.Uint32(d[0x28:])) << 32
	}
	return table, le.Uint16(d[0x12:]), nil
}

// extents returns the byte ranges an extent tree (root: 60 bytes of i_block)
// maps.
func (g *ext4Geometry) extents(disk io.ReaderAt, off int64, node []byte, level int) ([]extent, error) {
	return g.walkExtents(disk, off, node, level, nil)
}

// walkExtents is extents, calling block for every tree block below the root
// (its number and contents; block may change them and write them back).
func (g *ext4Geometry) walkExtents(disk io.ReaderAt, off int64, node []byte, level int, block func(n int64, b []byte) error) ([]extent, error) {
	le := binary.LittleEndian
	if le.Uint16(node) != 0xF30A || level > 5 {
		return nil, fmt.Errorf("%w: the journal inode has no extent tree", ErrExt4)
	}
	n := int(le.Uint16(node[2:]))
	depth := le.Uint16(node[6:])
	var out []extent
	for i := range n {
		e := node[12+12*i:]
		if len(e) < 12 {
			return nil, fmt.Errorf("%w: extent node overflows", ErrExt4)
		}
		if depth == 0 {
			l := int64(le.Uint16(e[4:]))
			if l > 32768 {
				l -= 32768 // unwritten
			}
			start := int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:]))
			out = append(out, extent{int64(le.Uint32(e)), start * g.blockSize, l * g.blockSize})
			continue
		}
		child := int64(le.Uint32(e[4:])) | int64(le.Uint16(e[8:]))<<32
		b := make([]byte, g.blockSize)
		if _, err := disk.ReadAt(b, off+child*g.blockSize); err != nil {
			return nil, fmt.Errorf("%w: read extent block: %v", ErrExt4, err)
		}
		sub, err := g.walkExtents(disk, off, b, level+1, block)
		if err != nil {
			return nil, err
		}
		if block != nil {
			if err := block(child, b); err != nil {
				return nil, err
			}
		}
		out = append(out, sub...)
	}
	return out, nil
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

// normalizeStats counts what restore changed.
type normalizeStats struct {
	Inodes       int  // inodes whose timestamps were clamped
	Generations  int  // inodes whose generation was reset
	Journal      bool // the journal was restored
	SuperChanged bool
}

// restore clamps inode timestamps to epoch and restores the superblock
// fields and the journal recorded by the snapshot.
func (s *ext4Snapshot) restore(disk readerWriterAt, epoch int64) (*normalizeStats, error) {
	st := &normalizeStats{}
	off := s.off
	sb := make([]byte, sbSize)
	if _, err := disk.ReadAt(sb, off+sbOffset); err != nil {
		return nil, fmt.Errorf("%w: read the superblock: %v", ErrExt4, err)
	}
	g, err := readGeometry(sb)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if st := le.Uint16(sb[0x3A:]); st&1 == 0 {
		return nil, fmt.Errorf("%w: the guest did not unmount it cleanly (s_state %#x)", ErrExt4, st)
	}

	// Inode tables.
	table := make([]byte, int64(g.inodesPerGroup)*int64(g.inodeSize))
	for grp := range g.groups {
		tb, flags, err := g.group(disk, off, grp)
		if err != nil {
			return nil, err
		}
		if flags&1 != 0 { // INODE_UNINIT
			continue
		}
		if _, err := disk.ReadAt(table, off+tb*g.blockSize); err != nil {
			return nil, fmt.Errorf("%w: read the inode table of group %d: %v", ErrExt4, grp, err)
		}
		dirty := false
		for i := range g.inodesPerGroup {
			in := table[int(i)*g.inodeSize : int(i+1)*g.inodeSize]
			ino := grp*g.inodesPerGroup + i + 1
			changed := clampInode(in, epoch)
			if changed {
				st.Inodes++
			}
			if le.Uint32(in[0x64:]) != 0 {
				// The kernel gives new inodes a random generation, which
				// seeds the checksums of the inode's metadata blocks.
				le.PutUint32(in[0x64:], 0)
				if g.csum {
					if err := g.fixBlockChecksums(disk, off, in, ino); err != nil {
						return nil, err
					}
				}
				st.Generations++
				changed = true
			}
			if changed {
				if g.csum {
					setInodeChecksum(in, g.csumSeed, ino)
				}
				dirty = true
			}
		}
		if dirty {
			if _, err := disk.WriteAt(table, off+tb*g.blockSize); err != nil {
				return nil, fmt.Errorf("%w: write the inode table of group %d: %v", ErrExt4, grp, err)
			}
		}
	}

	// Journal: clean (s_start == 0) after the unmount, so its old bytes are
	// as good as any.
	if len(s.journal) > 0 {
		jsb := make([]byte, 1024)
		if _, err := disk.ReadAt(jsb, off+s.journal[0].off); err != nil {
			return nil, fmt.Errorf("%w: read the journal superblock: %v", ErrExt4, err)
		}
		if binary.BigEndian.Uint32(jsb) != 0xC03B3998 {
			return nil, fmt.Errorf("%w: no jbd2 superblock at the journal's start", ErrExt4)
		}
		if binary.BigEndian.Uint32(jsb[0x1C:]) != 0 {
			return nil, fmt.Errorf("%w: the journal needs recovery: the guest did not unmount cleanly", ErrExt4)
		}
		for i, e := range s.journal {
			if _, err := disk.WriteAt(s.jdata[i], off+e.off); err != nil {
				return nil, fmt.Errorf("%w: restore the journal: %v", ErrExt4, err)
			}
		}
		st.Journal = true
	}

	// Superblock.
	old := append([]byte(nil), sb...)
	for _, f := range []struct{ at, n int }{
		{sbMtime, 4}, {sbWtime, 4}, {sbMntCount, 2}, {sbKbytesWritten, 8}, {sbWtimeHi, 1}, {sbMtimeHi, 1},
	} {
		copy(sb[f.at:f.at+f.n], s.sb[f.at:f.at+f.n])
	}
	if g.csum {
		le.PutUint32(sb[sbChecksum:], crc32c(^uint32(0), sb[:sbChecksum]))
	}
	if string(old) != string(sb) {
		st.SuperChanged = true
		if _, err := disk.WriteAt(sb, off+sbOffset); err != nil {
			return nil, fmt.Errorf("%w: write the superblock: %v", ErrExt4, err)
		}
	}
	return st, nil
}

// clampInode clamps the inode's timestamps to epoch and reports whether it
// changed anything.
func clampInode(in []byte, epoch int64) bool {
	le := binary.LittleEndian
	extraEnd := 128
	if len(in) > 128 {
		extraEnd = 128 + int(le.Uint16(in[0x80:]))
	}
	changed := false
	for _, f := range inodeTimes {
		if f.sec+4 > 128 && f.sec+4 > extraEnd {
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

// inodeChecksum computes the metadata_csum of an inode: crc32c over the
// seed, the inode number, the generation and the inode with its checksum
// fields zeroed.
func inodeChecksum(in []byte, seed, ino uint32) uint32 {
	le := binary.LittleEndian
	var b4 [4]byte
	le.PutUint32(b4[:], ino)
	c := crc32c(seed, b4[:])
	c = crc32c(c, in[0x64:0x68]) // i_generation
	tmp := append([]byte(nil), in...)
	tmp[0x7C], tmp[0x7D] = 0, 0
	if len(in) > 128 && 128+int(le.Uint16(in[0x80:])) >= 0x84 {
		tmp[0x82], tmp[0x83] = 0, 0
	}
	return crc32c(c, tmp)
}

func setInodeChecksum(in []byte, seed, ino uint32) {
	le := binary.LittleEndian
	c := inodeChecksum(in, seed, ino)
	le.PutUint16(in[0x7C:], uint16(c))
	if len(in) > 128 && 128+int(le.Uint16(in[0x80:])) >= 0x84 {
		le.PutUint16(in[0x82:], uint16(c>>16))
	}
}

// inodeSeed is the checksum seed of an inode's metadata blocks.
func (g *ext4Geometry) inodeSeed(in []byte, ino uint32) uint32 {
	var b4 [4]byte
	binary.LittleEndian.PutUint32(b4[:], ino)
	return crc32c(crc32c(g.csumSeed, b4[:]), in[0x64:0x68])
}

// fixBlockChecksums recomputes the checksums of the inode's extent tree
// blocks and, for a directory, of its leaf blocks (dirent tail) and htree
// nodes (dx tail), which the inode's generation seeds.
func (g *ext4Geometry) fixBlockChecksums(disk readerWriterAt, off int64, in []byte, ino uint32) error {
	le := binary.LittleEndian
	flags := le.Uint32(in[0x20:])
	if flags&0x80000 == 0 { // not extents: inline data or block maps, untouched here
		if le.Uint16(in[0x1A:]) != 0 && flags&0x10000000 == 0 && le.Uint32(in[0x28:]) != 0 {
			return fmt.Errorf("%w: inode %d uses block maps", ErrExt4, ino)
		}
		return nil
	}
	seed := g.inodeSeed(in, ino)
	exts, err := g.walkExtents(disk, off, in[0x28:0x28+60], 0, func(n int64, b []byte) error {
		max := int(le.Uint16(b[4:]))
		tail := 12 + 12*max
		if tail+4 > len(b) {
			return fmt.Errorf("%w: inode %d: extent block %d overflows", ErrExt4, ino, n)
		}
		le.PutUint32(b[tail:], crc32c(seed, b[:tail]))
		_, err := disk.WriteAt(b, off+n*g.blockSize)
		return err
	})
	if err != nil {
		return err
	}
	if le.Uint16(in[0:])&0xF000 != 0x4000 {
		return nil
	}
	indexed := flags&0x1000 != 0
	b := make([]byte, g.blockSize)
	bs := int(g.blockSize)
	for _, e := range exts {
		for k := int64(0); k < e.len/g.blockSize; k++ {
			at := off + e.off + k*g.blockSize
			if _, err := disk.ReadAt(b, at); err != nil {
				return fmt.Errorf("%w: read directory block: %v", ErrExt4, err)
			}
			lblk := e.lblk + k
			switch {
			case indexed && lblk == 0:
				if err := dxChecksum(b, seed, 24+int(b[24+5])); err != nil {
					return fmt.Errorf("%w: inode %d: %v", ErrExt4, ino, err)
				}
			case indexed && le.Uint32(b) == 0 && int(le.Uint16(b[4:])) == bs:
				if err := dxChecksum(b, seed, 8); err != nil {
					return fmt.Errorf("%w: inode %d: %v", ErrExt4, ino, err)
				}
			default:
				t := b[bs-12:]
				if le.Uint32(t) != 0 || le.Uint16(t[4:]) != 12 || t[6] != 0 || t[7] != 0xDE {
					return fmt.Errorf("%w: inode %d: directory block %d has no checksum tail", ErrExt4, ino, lblk)
				}
				le.PutUint32(t[8:], crc32c(seed, b[:bs-12]))
			}
			if _, err := disk.WriteAt(b, at); err != nil {
				return fmt.Errorf("%w: write directory block: %v", ErrExt4, err)
			}
		}
	}
	return nil
}

// dxChecksum sets the checksum of an htree node whose count/limit header
// is at countOffset.
func dxChecksum(b []byte, seed uint32, countOffset int) error {
	le := binary.LittleEndian
	limit := int(le.Uint16(b[countOffset:]))
	count := int(le.Uint16(b[countOffset+2:]))
	tail := countOffset + limit*8
	if count > limit || tail+8 > len(b) {
		return fmt.Errorf("htree node count %d, limit %d do not fit the block", count, limit)
	}
	c := crc32c(seed, b[:countOffset+count*8])
	c = crc32c(c, b[tail:tail+4])
	c = crc32c(c, []byte{0, 0, 0, 0})
	le.PutUint32(b[tail+4:], c)
	return nil
}
