package ext4

import (
	"encoding/binary"
)

// Superblock and feature constants (Documentation/filesystems/ext4/super.rst).
const (
	compatHasJournal = 0x4
	compatExtAttr    = 0x8
	compatDirIndex   = 0x20

	incompatFiletype = 0x2
	incompatExtents  = 0x40
	incompat64bit    = 0x80
	incompatFlexBG   = 0x200

	roSparseSuper  = 0x1
	roLargeFile    = 0x2
	roHugeFile     = 0x8
	roDirNlink     = 0x20
	roExtraIsize   = 0x40
	roMetadataCsum = 0x400

	bgInodeUninit = 0x1
	bgInodeZeroed = 0x4

	flagsUnsignedHash = 0x2
)

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
		seed := w.inodeSeed(d.ino)
		var blocks [][]byte
		if d.ino == lostFoundIno {
			for i := 0; i < lostFoundBlocks; i++ {
				b := make([]byte, blockSize)
				if i == 0 {
					putLeaf(b, []dirent{{".", d.ino, ftDir}, {"..", d.parent, ftDir}}, seed)
				} else {
					putLeaf(b, nil, seed)
				}
				blocks = append(blocks, b)
			}
			// lost+found may have received entries from headers.
			if len(d.entries) > 0 {
				bs, idx, err := buildDir(d, seed, w.hashSeed)
				if err != nil {
					return err
				}
				blocks = bs
				if idx {
					in.flags |= flagIndex
				}
			}
		} else {
			bs, idx, err := buildDir(d, seed, w.hashSeed)
			if err != nil {
				return err
			}
			blocks = bs
			if idx {
				in.flags |= flagIndex
			}
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
	c := crc32c(w.inodeSeed(ino), b[:inodeSize])
	le.PutUint16(b[0x7C:], uint16(c))
	le.PutUint16(b[0x82:], uint16(c>>16))
}

func (w *Writer) writeInodes(stats []groupStats) error {
	n := uint32(len(w.inodes))
	ipg := w.g.ipg
	buf := make([]byte, blockSize)
	w.ibitmaps = make([][]byte, w.g.groups)
	for gi := uint32(0); gi < w.g.groups; gi++ {
		st := &stats[gi]
		first := gi*ipg + 1
		st.flags = bgInodeZeroed
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
			st.flags |= bgInodeUninit
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
		st.bbCsum = crc32c(w.csumSeed, bm)
		if err := w.writeBlock(w.g.bbitmap[gi], bm); err != nil {
			return err
		}

		clear(bm)
		if ib := w.ibitmaps[gi]; ib != nil {
			copy(bm, ib)
		}
		st.ibCsum = crc32c(w.csumSeed, bm[:w.g.ipg/8])
		setBits(bm, uint64(w.g.ipg), blocksPerGrp)
		if st.flags&bgInodeUninit == 0 {
			if err := w.writeBlock(w.g.ibitmap[gi], bm); err != nil {
				return err
			}
		}
	}
	return nil
}

func (w *Writer) writeDescriptorsAndSupers(stats []groupStats) error {
	le := binary.LittleEndian
	gdt := make([]byte, int(w.g.gdtBlocks)*blockSize)
	var freeBlocks, freeInodes uint64
	for gi := uint32(0); gi < w.g.groups; gi++ {
		st := &stats[gi]
		freeBlocks += uint64(st.freeBlocks)
		freeInodes += uint64(st.freeInodes)
		d := gdt[gi*descSize : (gi+1)*descSize]
		bb, ib, it := w.g.bbitmap[gi], w.g.ibitmap[gi], w.g.itable[gi]
		le.PutUint32(d[0x0:], uint32(bb))
		le.PutUint32(d[0x4:], uint32(ib))
		le.PutUint32(d[0x8:], uint32(it))
		le.PutUint16(d[0xC:], uint16(st.freeBlocks))
		le.PutUint16(d[0xE:], uint16(st.freeInodes))
		le.PutUint16(d[0x10:], uint16(st.usedDirs))
		le.PutUint16(d[0x12:], st.flags)
		le.PutUint16(d[0x18:], uint16(st.bbCsum))
		le.PutUint16(d[0x1A:], uint16(st.ibCsum))
		le.PutUint16(d[0x1C:], uint16(st.itableUnused))
		le.PutUint32(d[0x20:], uint32(bb>>32))
		le.PutUint32(d[0x24:], uint32(ib>>32))
		le.PutUint32(d[0x28:], uint32(it>>32))
		le.PutUint16(d[0x2C:], uint16(st.freeBlocks>>16))
		le.PutUint16(d[0x2E:], uint16(st.freeInodes>>16))
		le.PutUint16(d[0x30:], uint16(st.usedDirs>>16))
		le.PutUint16(d[0x32:], uint16(st.itableUnused>>16))
		le.PutUint16(d[0x38:], uint16(st.bbCsum>>16))
		le.PutUint16(d[0x3A:], uint16(st.ibCsum>>16))
		var gn [4]byte
		le.PutUint32(gn[:], gi)
		c := crc32c(w.csumSeed, gn[:])
		c = crc32c(c, d)
		le.PutUint16(d[0x1E:], uint16(c))
	}
	for gi := uint32(0); gi < w.g.groups; gi++ {
		if !hasSuper(gi) {
			continue
		}
		start := uint64(gi) * blocksPerGrp
		blk := make([]byte, blockSize)
		off := 0
		if gi == 0 {
			off = 1024
		}
		w.encodeSuper(blk[off:off+1024], gi, freeBlocks, freeInodes)
		if err := w.writeBlock(start, blk); err != nil {
			return err
		}
		if _, err := w.dst.WriteAt(gdt, int64(start+1)*blockSize); err != nil {
			return err
		}
	}
	return nil
}

func (w *Writer) encodeSuper(b []byte, group uint32, freeBlocks, freeInodes uint64) {
	le := binary.LittleEndian
	g, o := w.g, w.opts
	le.PutUint32(b[0x0:], uint32(g.inodes()))
	le.PutUint32(b[0x4:], uint32(g.blocks))
	le.PutUint32(b[0xC:], uint32(freeBlocks))
	le.PutUint32(b[0x10:], uint32(freeInodes))
	le.PutUint32(b[0x14:], 0) // s_first_data_block
	le.PutUint32(b[0x18:], 2) // s_log_block_size: 4 KiB
	le.PutUint32(b[0x1C:], 2) // s_log_cluster_size
	le.PutUint32(b[0x20:], blocksPerGrp)
	le.PutUint32(b[0x24:], blocksPerGrp)
	le.PutUint32(b[0x28:], g.ipg)
	le.PutUint32(b[0x30:], uint32(o.Time)) // s_wtime
	le.PutUint16(b[0x36:], 0xFFFF)         // s_max_mnt_count: -1
	le.PutUint16(b[0x38:], 0xEF53)
	le.PutUint16(b[0x3A:], 1) // s_state: clean
	le.PutUint16(b[0x3C:], 1) // s_errors: continue
	le.PutUint32(b[0x40:], uint32(o.Time))
	le.PutUint32(b[0x4C:], 1) // s_rev_level: dynamic
	le.PutUint32(b[0x54:], firstIno)
	le.PutUint16(b[0x58:], inodeSize)
	le.PutUint16(b[0x5A:], uint16(group))
	le.PutUint32(b[0x5C:], compatHasJournal|compatExtAttr|compatDirIndex)
	le.PutUint32(b[0x60:], incompatFiletype|incompatExtents|incompat64bit|incompatFlexBG)
	le.PutUint32(b[0x64:], roSparseSuper|roLargeFile|roHugeFile|roDirNlink|roExtraIsize|roMetadataCsum)
	copy(b[0x68:0x78], o.UUID[:])
	copy(b[0x78:0x88], o.Label)
	le.PutUint32(b[0xE0:], journalIno)
	copy(b[0xEC:0xFC], o.HashSeed[:])
	b[0xFC] = dxHashHalf
	b[0xFD] = 1 // s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS
	le.PutUint16(b[0xFE:], descSize)
	le.PutUint32(b[0x100:], 0x000C) // s_default_mount_opts: user_xattr,acl
	le.PutUint32(b[0x108:], uint32(o.Time))
	j := &w.inodes[journalIno-1]
	copy(b[0x10C:0x10C+60], j.iblock[:])
	le.PutUint32(b[0x10C+60:], uint32(j.size>>32))
	le.PutUint32(b[0x10C+64:], uint32(j.size))
	le.PutUint32(b[0x150:], uint32(g.blocks>>32))
	le.PutUint32(b[0x158:], uint32(freeBlocks>>32))
	le.PutUint16(b[0x15C:], extraIsize)
	le.PutUint16(b[0x15E:], extraIsize)
	le.PutUint32(b[0x160:], flagsUnsignedHash)
	b[0x174] = flexLog
	b[0x175] = 1 // s_checksum_type: crc32c
	le.PutUint32(b[0x3FC:], crc32c(^uint32(0), b[:0x3FC]))
}
