package ext4

import (
	"encoding/binary"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
)

const flagsUnsignedHash = 0x2 // s_flags: EXT2_FLAGS_UNSIGNED_HASH

type groupStats struct {
	freeBlocks, freeInodes, usedDirs, itableUnused uint32
	flags                                          uint16
	bbCsum, ibCsum                                 uint32
}

func (w *Writer) finish() error {
	if err := w.writeDirs(); err != nil {
		return err
	}
	stats := make([]groupStats, w.g.groups)
	if err := w.writeInodes(stats); err != nil {
		return err
	}
	if err := w.writeBitmaps(stats); err != nil {
		return err
	}
	return w.writeDescriptorsAndSupers(stats)
}

func (w *Writer) writeDirs() error {
	for _, d := range w.dirs {
		in := &w.inodes[d.ino-1]
		blocks, idx, err := w.dirBlocks(d)
		if err != nil {
			return err
		}
		if idx {
			in.flags |= flagIndex
		}
		n := uint64(len(blocks))
		w.cu = d.unit
		runs, err := w.allocBlocks(n)
		if err != nil {
			return err
		}
		i := 0
		for _, r := range runs {
			for b := r.start; b < r.end(); b++ {
				if err := w.writeBlock(b, blocks[i]); err != nil {
					return err
				}
				i++
			}
		}
		in.flags |= flagExtents
		tb, err := w.extentTree(&in.iblock, d.ino, runsToExtents(runs, 0))
		if err != nil {
			return err
		}
		in.blocks = n + tb
		in.size = n * blockSize
		in.links = 2 + d.subdirs
		if in.links > linkMax {
			in.links = 1
		}
		d.entries = nil
	}
	return nil
}

// dirBlocks returns the blocks of directory d and whether they are
// hash-indexed. An empty lost+found has lostFoundBlocks blocks, like
// mke2fs's.
func (w *Writer) dirBlocks(d *dirInfo) ([][]byte, bool, error) {
	seed := w.inodeSeed(d.ino)
	if d.ino != lostFoundIno || len(d.entries) > 0 {
		return buildDir(d, seed, w.hashSeed)
	}
	var blocks [][]byte
	for i := 0; i < lostFoundBlocks; i++ {
		b := make([]byte, blockSize)
		if i == 0 {
			putLeaf(b, []dirent{{".", d.ino, ftDir}, {"..", d.parent, ftDir}}, seed)
		} else {
			putLeaf(b, nil, seed)
		}
		blocks = append(blocks, b)
	}
	return blocks, false, nil
}

// encodeTime splits seconds into the 32-bit field and the epoch bits of the
// _extra field (nanoseconds are 0).
func encodeTime(t int64) (uint32, uint32) {
	return uint32(t), uint32((t-int64(int32(t)))>>32) & 3
}

func (w *Writer) encodeInode(b []byte, ino uint32, in *inode) {
	le := binary.LittleEndian
	clear(b[:inodeSize])
	le.PutUint16(b[0x0:], in.mode)
	le.PutUint16(b[0x2:], uint16(in.uid))
	le.PutUint32(b[0x4:], uint32(in.size))
	if in.mode != 0 {
		t, extra := encodeTime(in.mtime)
		le.PutUint32(b[0x8:], t)
		le.PutUint32(b[0xC:], t)
		le.PutUint32(b[0x10:], t)
		le.PutUint32(b[0x90:], t)
		for _, off := range []int{0x84, 0x88, 0x8C, 0x94} {
			le.PutUint32(b[off:], extra)
		}
	}
	le.PutUint16(b[0x18:], uint16(in.gid))
	le.PutUint16(b[0x1A:], uint16(in.links))
	sectors := in.blocks * (blockSize / 512)
	le.PutUint32(b[0x1C:], uint32(sectors))
	le.PutUint32(b[0x20:], in.flags)
	copy(b[0x28:], in.iblock[:])
	le.PutUint32(b[0x6C:], uint32(in.size>>32))
	le.PutUint16(b[0x74:], uint16(sectors>>32))
	le.PutUint16(b[0x78:], uint16(in.uid>>16))
	le.PutUint16(b[0x7A:], uint16(in.gid>>16))
	le.PutUint16(b[0x80:], extraIsize)
	ondisk.SetInodeChecksum(b[:inodeSize], w.csumSeed, ino)
}

func (w *Writer) writeInodes(stats []groupStats) error {
	n := uint32(len(w.inodes))
	ipg := w.g.ipg
	buf := make([]byte, blockSize)
	w.ibitmaps = make([][]byte, w.g.groups)
	for gi := uint32(0); gi < w.g.groups; gi++ {
		st := &stats[gi]
		first := gi*ipg + 1
		st.flags = ondisk.BGInodeZeroed
		// The table is written up to the group's last used inode; unused
		// inodes below it (left by units of a previous image) are zero.
		last := uint32(0)
		if first <= n {
			for ino := min(n, first+ipg-1); ino >= first; ino-- {
				if w.inodeUsed(ino) {
					last = ino
					break
				}
			}
		}
		if last == 0 {
			st.flags |= ondisk.BGInodeUninit
			st.freeInodes, st.itableUnused = ipg, ipg
			continue
		}
		count := last - first + 1
		st.itableUnused = ipg - count
		bm := make([]byte, blockSize)
		used := uint32(0)
		per := uint32(blockSize / inodeSize)
		for blk := uint32(0); blk*per < count; blk++ {
			clear(buf)
			for k := uint32(0); k < per && blk*per+k < count; k++ {
				ino := first + blk*per + k
				if !w.inodeUsed(ino) {
					continue
				}
				used++
				bm[(ino-first)/8] |= 1 << ((ino - first) % 8)
				in := &w.inodes[ino-1]
				if in.dir != nil {
					st.usedDirs++
				}
				w.encodeInode(buf[k*inodeSize:], ino, in)
			}
			if err := w.writeBlock(w.g.itable[gi]+uint64(blk), buf); err != nil {
				return err
			}
		}
		st.freeInodes = ipg - used
		w.ibitmaps[gi] = bm
	}
	return nil
}

// inodeUsed reports whether inode ino is in use: the reserved inodes
// always are, others when the tree has them.
func (w *Writer) inodeUsed(ino uint32) bool {
	return ino <= lostFoundIno || w.inodes[ino-1].mode != 0
}

func setBits(bm []byte, from, to uint64) {
	for from < to && from%8 != 0 {
		bm[from/8] |= 1 << (from % 8)
		from++
	}
	for from+8 <= to {
		bm[from/8] = 0xFF
		from += 8
	}
	for from < to {
		bm[from/8] |= 1 << (from % 8)
		from++
	}
}

// mergeRanges merges two sorted, disjoint lists of ranges.
func mergeRanges(a, b []blockRange) []blockRange {
	out := make([]blockRange, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		if j >= len(b) || (i < len(a) && a[i].start < b[j].start) {
			out = append(out, a[i])
			i++
		} else {
			out = append(out, b[j])
			j++
		}
	}
	return out
}

func (w *Writer) writeBitmaps(stats []groupStats) error {
	ranges := mergeRanges(w.g.reserved, w.alloc.usedSorted())
	bm := make([]byte, blockSize)
	ri := 0
	for gi := uint32(0); gi < w.g.groups; gi++ {
		st := &stats[gi]
		gs := uint64(gi) * blocksPerGrp
		gn := w.g.groupBlocks(gi)
		ge := gs + gn
		clear(bm)
		used := uint64(0)
		for ri < len(ranges) && ranges[ri].start < ge {
			r := ranges[ri]
			s, e := max(r.start, gs), min(r.end(), ge)
			if s < e {
				setBits(bm, s-gs, e-gs)
				used += e - s
			}
			if r.end() > ge {
				break
			}
			ri++
		}
		setBits(bm, gn, blocksPerGrp)
		st.freeBlocks = uint32(gn - used)
		st.bbCsum = ondisk.CRC32C(w.csumSeed, bm)
		if err := w.writeBlock(w.g.bbitmap[gi], bm); err != nil {
			return err
		}

		clear(bm)
		if ib := w.ibitmaps[gi]; ib != nil {
			copy(bm, ib)
		}
		st.ibCsum = ondisk.CRC32C(w.csumSeed, bm[:w.g.ipg/8])
		setBits(bm, uint64(w.g.ipg), blocksPerGrp)
		if st.flags&ondisk.BGInodeUninit == 0 {
			if err := w.writeBlock(w.g.ibitmap[gi], bm); err != nil {
				return err
			}
		}
	}
	return nil
}

func (w *Writer) writeDescriptorsAndSupers(stats []groupStats) error {
	gdt := make([]byte, int(w.g.gdtBlocks)*blockSize)
	var freeBlocks, freeInodes uint64
	for gi := uint32(0); gi < w.g.groups; gi++ {
		st := &stats[gi]
		freeBlocks += uint64(st.freeBlocks)
		freeInodes += uint64(st.freeInodes)
		d := ondisk.GroupDesc{
			BlockBitmap: w.g.bbitmap[gi], InodeBitmap: w.g.ibitmap[gi], InodeTable: w.g.itable[gi],
			FreeBlocksCount: st.freeBlocks, FreeInodesCount: st.freeInodes, UsedDirsCount: st.usedDirs,
			ItableUnused: st.itableUnused, Flags: st.flags, BlockBitmapCsum: st.bbCsum, InodeBitmapCsum: st.ibCsum,
		}
		b := gdt[gi*descSize : (gi+1)*descSize]
		d.Put(b)
		ondisk.SetGroupDescChecksum(w.csumSeed, gi, b)
	}
	sb := w.superblock(freeBlocks, freeInodes)
	for gi := uint32(0); gi < w.g.groups; gi++ {
		if !hasSuper(gi) {
			continue
		}
		start := uint64(gi) * blocksPerGrp
		blk := make([]byte, blockSize)
		off := 0
		if gi == 0 {
			off = ondisk.SuperblockOffset
		}
		sb.BlockGroupNr = uint16(gi)
		copy(blk[off:], sb.Marshal())
		if err := w.writeBlock(start, blk); err != nil {
			return err
		}
		if _, err := w.dst.WriteAt(gdt, int64(start+1)*blockSize); err != nil {
			return err
		}
	}
	return nil
}

// superblock is the image's superblock (BlockGroupNr 0).
func (w *Writer) superblock(freeBlocks, freeInodes uint64) *ondisk.Superblock {
	g, o := w.g, w.opts
	t := uint32(o.Time)
	s := &ondisk.Superblock{
		InodesCount: uint32(g.inodes()), BlocksCount: g.blocks,
		FreeBlocksCount: freeBlocks, FreeInodesCount: uint32(freeInodes),
		LogBlockSize: 2, LogClusterSize: 2, // 4 KiB
		BlocksPerGroup: blocksPerGrp, ClustersPerGroup: blocksPerGrp, InodesPerGroup: g.ipg,
		Wtime: t, LastCheck: t, MkfsTime: t,
		MaxMntCount: 0xFFFF, // -1
		Magic:       ondisk.Magic,
		State:       1, // clean
		Errors:      1, // continue
		RevLevel:    1, // dynamic
		FirstIno:    firstIno, InodeSize: inodeSize,
		FeatureCompat:   ondisk.CompatHasJournal | ondisk.CompatExtAttr | ondisk.CompatDirIndex,
		FeatureIncompat: ondisk.IncompatFiletype | ondisk.IncompatExtents | ondisk.Incompat64bit | ondisk.IncompatFlexBG,
		FeatureRoCompat: ondisk.RoCompatSparseSuper | ondisk.RoCompatLargeFile | ondisk.RoCompatHugeFile |
			ondisk.RoCompatDirNlink | ondisk.RoCompatExtraIsize | ondisk.RoCompatMetadataCsum,
		UUID:             o.UUID,
		JournalInum:      journalIno,
		HashSeed:         o.HashSeed,
		DefHashVersion:   dxHashHalf,
		JnlBackupType:    1, // EXT3_JNL_BACKUP_BLOCKS
		DescSize:         descSize,
		DefaultMountOpts: 0x000C, // user_xattr,acl
		MinExtraIsize:    extraIsize, WantExtraIsize: extraIsize,
		Flags:            flagsUnsignedHash,
		LogGroupsPerFlex: flexLog,
		ChecksumType:     1, // crc32c
	}
	copy(s.VolumeName[:], o.Label)
	j := &w.inodes[journalIno-1]
	for i := 0; i < 15; i++ {
		s.JnlBlocks[i] = binary.LittleEndian.Uint32(j.iblock[4*i:])
	}
	s.JnlBlocks[15], s.JnlBlocks[16] = uint32(j.size>>32), uint32(j.size)
	return s
}
