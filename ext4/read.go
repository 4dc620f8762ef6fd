package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
)

// ErrNotExt4 reports an image that ReadPlacements cannot read.
var ErrNotExt4 = errors.New("ext4: not a file system this package reads")

// ReadPlacements reads the file system in r, written by a Writer, and
// returns its Options (Size, Label, UUID, HashSeed, Time) and the
// Placements its Writer reported, for a tree whose units are given by unit:
// unit(name) names the unit of the entry at name (slash-separated, relative
// to the root, e.g. "nix/store/abc-hello/bin"); the journal, the root and
// lost+found belong to "". Within each unit, entries are taken to have come
// in name order (depth first, as a NAR lists them), and a file with several
// links belongs to the first. So a tree written that way, passed back as
// Options.Previous, keeps its layout without the Writer's own report.
//
// It reads only what it needs: the superblock, the group descriptors, the
// inodes of the tree, directories and extent trees; checksums are not
// verified. It needs 4 KiB blocks, 64bit descriptors and extents, as the
// Writer makes them.
func ReadPlacements(r io.ReaderAt, unit func(name string) string) (Options, map[string]Placement, error) {
	rd := &reader{r: r}
	opts, err := rd.super()
	if err != nil {
		return Options{}, nil, err
	}
	out := map[string]*unitState{}
	get := func(name string) *unitState {
		u := out[name]
		if u == nil {
			u = &unitState{name: name}
			out[name] = u
		}
		return u
	}
	addBlocks := func(u *unitState, rs []blockRange) {
		for _, r := range rs {
			u.rep.Blocks = appendRange(u.rep.Blocks, r)
		}
	}
	type dirRef struct {
		u   *unitState
		ino uint32
	}
	var dirs []dirRef
	root := get("")
	if err := rd.fileBlocks(journalIno, func(rs []blockRange) { addBlocks(root, rs) }); err != nil {
		return Options{}, nil, fmt.Errorf("journal: %w", err)
	}
	dirs = append(dirs, dirRef{root, rootIno}, dirRef{root, lostFoundIno})
	seen := map[uint32]bool{rootIno: true, lostFoundIno: true, journalIno: true}
	var walk func(ino uint32, name string, depth int) error
	walk = func(dino uint32, dname string, depth int) error {
		if depth > 4096 {
			return fmt.Errorf("%w: directories nested deeper than 4096", ErrNotExt4)
		}
		ents, err := rd.readDir(dino)
		if err != nil {
			return fmt.Errorf("directory %q: %w", dname, err)
		}
		for _, e := range ents {
			name := e.name
			if dname != "." {
				name = dname + "/" + e.name
			}
			if e.ino == lostFoundIno && dino == rootIno {
				continue
			}
			if seen[e.ino] {
				if e.ftype == ftDir {
					return fmt.Errorf("%w: directory %q (inode %d) linked twice", ErrNotExt4, name, e.ino)
				}
				continue // a hard link: the first name owns the inode
			}
			seen[e.ino] = true
			u := get(unit(name))
			if e.ino <= lostFoundIno || uint64(e.ino) > rd.inodes {
				return fmt.Errorf("%w: %q has inode %d", ErrNotExt4, name, e.ino)
			}
			u.rep.Inodes = appendRange(u.rep.Inodes, blockRange{uint64(e.ino), 1})
			in, err := rd.inode(e.ino)
			if err != nil {
				return err
			}
			if in.mode&0xF000 == sIFDIR {
				dirs = append(dirs, dirRef{u, e.ino})
				if err := walk(e.ino, name, depth+1); err != nil {
					return err
				}
				continue
			}
			if err := rd.fileBlocks(e.ino, func(rs []blockRange) { addBlocks(u, rs) }); err != nil {
				return fmt.Errorf("%q: %w", name, err)
			}
		}
		return nil
	}
	if err := walk(rootIno, ".", 0); err != nil {
		return Options{}, nil, err
	}
	// Directory blocks come last in each unit, in the order the
	// directories were made: the Writer allocates them at Close.
	for _, d := range dirs {
		if err := rd.fileBlocks(d.ino, func(rs []blockRange) { addBlocks(d.u, rs) }); err != nil {
			return Options{}, nil, fmt.Errorf("directory inode %d: %w", d.ino, err)
		}
	}
	ps := make(map[string]Placement, len(out))
	for n, u := range out {
		ps[n] = u.rep
	}
	return opts, ps, nil
}

type reader struct {
	r         io.ReaderAt
	blocks    uint64
	inodes    uint64
	ipg       uint32
	inodeSize uint32
	itable    []uint64
	buf       [blockSize]byte
}

func (rd *reader) readBlock(b uint64) ([]byte, error) {
	if b >= rd.blocks {
		return nil, fmt.Errorf("%w: block %d beyond the %d blocks", ErrNotExt4, b, rd.blocks)
	}
	if _, err := rd.r.ReadAt(rd.buf[:], int64(b)*blockSize); err != nil {
		return nil, fmt.Errorf("read block %d: %w", b, err)
	}
	return rd.buf[:], nil
}

func (rd *reader) super() (Options, error) {
	var sb [1024]byte
	if _, err := rd.r.ReadAt(sb[:], 1024); err != nil {
		return Options{}, fmt.Errorf("%w: read superblock: %w", ErrNotExt4, err)
	}
	le := binary.LittleEndian
	if m := le.Uint16(sb[0x38:]); m != 0xEF53 {
		return Options{}, fmt.Errorf("%w: magic: got %#x, want 0xef53", ErrNotExt4, m)
	}
	if l := le.Uint32(sb[0x18:]); l != 2 {
		return Options{}, fmt.Errorf("%w: block size: got %d, want 4096", ErrNotExt4, 1024<<l)
	}
	incompat := le.Uint32(sb[0x60:])
	if incompat&(incompat64bit|incompatExtents) != incompat64bit|incompatExtents || le.Uint16(sb[0xFE:]) != descSize {
		return Options{}, fmt.Errorf("%w: want 64bit descriptors of %d bytes and extents, got features %#x", ErrNotExt4, descSize, incompat)
	}
	rd.blocks = uint64(le.Uint32(sb[0x4:])) | uint64(le.Uint32(sb[0x150:]))<<32
	rd.ipg = le.Uint32(sb[0x28:])
	rd.inodeSize = uint32(le.Uint16(sb[0x58:]))
	if bpg := le.Uint32(sb[0x20:]); bpg != blocksPerGrp || rd.ipg == 0 || rd.ipg > blocksPerGrp || rd.inodeSize < 128 || rd.inodeSize > blockSize || rd.blocks == 0 || rd.blocks > maxBlocks {
		return Options{}, fmt.Errorf("%w: geometry: %d blocks, %d per group, %d inodes per group of %d bytes", ErrNotExt4, rd.blocks, bpg, rd.ipg, rd.inodeSize)
	}
	groups := (rd.blocks + blocksPerGrp - 1) / blocksPerGrp
	rd.inodes = groups * uint64(rd.ipg)
	if uint64(le.Uint32(sb[0x0:])) != rd.inodes {
		return Options{}, fmt.Errorf("%w: inode count: got %d, want %d", ErrNotExt4, le.Uint32(sb[0x0:]), rd.inodes)
	}
	o := Options{Size: int64(rd.blocks) * blockSize, Time: int64(le.Uint32(sb[0x30:]))}
	copy(o.UUID[:], sb[0x68:0x78])
	copy(o.HashSeed[:], sb[0xEC:0xFC])
	label := sb[0x78:0x88]
	for i, c := range label {
		if c == 0 {
			label = label[:i]
			break
		}
	}
	o.Label = string(label)
	rd.itable = make([]uint64, groups)
	for gi := uint64(0); gi < groups; gi++ {
		off := gi * descSize
		b, err := rd.readBlock(1 + off/blockSize)
		if err != nil {
			return Options{}, err
		}
		d := b[off%blockSize:]
		rd.itable[gi] = uint64(le.Uint32(d[0x8:])) | uint64(le.Uint32(d[0x28:]))<<32
	}
	return o, nil
}

type rinode struct {
	mode   uint16
	size   uint64
	flags  uint32
	iblock [60]byte
}

func (rd *reader) inode(ino uint32) (*rinode, error) {
	if ino == 0 || uint64(ino) > rd.inodes {
		return nil, fmt.Errorf("%w: inode %d out of 1 to %d", ErrNotExt4, ino, rd.inodes)
	}
	i := uint64(ino - 1)
	off := uint64(i%uint64(rd.ipg)) * uint64(rd.inodeSize)
	b, err := rd.readBlock(rd.itable[i/uint64(rd.ipg)] + off/blockSize)
	if err != nil {
		return nil, err
	}
	p := b[off%blockSize:]
	le := binary.LittleEndian
	in := &rinode{
		mode:  le.Uint16(p[0x0:]),
		size:  uint64(le.Uint32(p[0x4:])) | uint64(le.Uint32(p[0x6C:]))<<32,
		flags: le.Uint32(p[0x20:]),
	}
	copy(in.iblock[:], p[0x28:0x28+60])
	return in, nil
}

// fileBlocks reports the blocks of inode ino in the Writer's allocation
// order: data in logical order, then the extent tree's leaves, then each
// index level above them. Inodes without extents (fast symlinks) have none.
func (rd *reader) fileBlocks(ino uint32, fn func([]blockRange)) error {
	in, err := rd.inode(ino)
	if err != nil {
		return err
	}
	if in.flags&flagExtents == 0 {
		return nil
	}
	var data []blockRange
	levels := make([][]blockRange, maxExtentDepth+1)
	var node func(b []byte, depth int, budget *int) error
	node = func(b []byte, wantDepth int, budget *int) error {
		le := binary.LittleEndian
		if le.Uint16(b[0:]) != extentMagic {
			return fmt.Errorf("%w: inode %d: bad extent header", ErrNotExt4, ino)
		}
		n, depth := int(le.Uint16(b[2:])), int(le.Uint16(b[6:]))
		if (wantDepth >= 0 && depth != wantDepth) || depth > maxExtentDepth || 12+12*n > len(b) {
			return fmt.Errorf("%w: inode %d: extent node of depth %d with %d entries", ErrNotExt4, ino, depth, n)
		}
		for i := 0; i < n; i++ {
			e := b[12+12*i:]
			if depth == 0 {
				l := uint64(le.Uint16(e[4:]))
				if l > maxExtentLen {
					l -= maxExtentLen // unwritten: still allocated
				}
				start := uint64(le.Uint32(e[8:])) | uint64(le.Uint16(e[6:]))<<32
				if l == 0 || start >= rd.blocks || l > rd.blocks-start {
					return fmt.Errorf("%w: inode %d: extent %d+%d", ErrNotExt4, ino, start, l)
				}
				data = appendRun(data, blockRange{start, l})
				continue
			}
			*budget--
			if *budget < 0 {
				return fmt.Errorf("%w: inode %d: extent tree too big", ErrNotExt4, ino)
			}
			child := uint64(le.Uint32(e[4:])) | uint64(le.Uint16(e[8:]))<<32
			levels[depth-1] = appendRun(levels[depth-1], blockRange{child, 1})
			cb, err := rd.readBlock(child)
			if err != nil {
				return err
			}
			cp := append([]byte(nil), cb...)
			if err := node(cp, depth-1, budget); err != nil {
				return err
			}
		}
		return nil
	}
	budget := 1 << 20
	if err := node(in.iblock[:], -1, &budget); err != nil {
		return err
	}
	fn(data)
	for _, l := range levels {
		fn(l)
	}
	return nil
}

// readDir returns the entries of directory ino but "." and "..", sorted by
// name.
func (rd *reader) readDir(ino uint32) ([]dirent, error) {
	var blocks []blockRange
	if err := rd.fileBlocks(ino, func(rs []blockRange) {
		if blocks == nil {
			blocks = append([]blockRange(nil), rs...)
		}
	}); err != nil {
		return nil, err
	}
	var ents []dirent
	le := binary.LittleEndian
	for _, r := range blocks {
		for b := r.start; b < r.end(); b++ {
			p, err := rd.readBlock(b)
			if err != nil {
				return nil, err
			}
			for off := 0; off+8 <= blockSize; {
				rl := int(le.Uint16(p[off+4:]))
				nl := int(p[off+6])
				if rl < 8 || off+rl > blockSize || 8+nl > rl {
					return nil, fmt.Errorf("%w: directory inode %d: bad entry at block %d offset %d", ErrNotExt4, ino, b, off)
				}
				if e := le.Uint32(p[off:]); e != 0 {
					name := string(p[off+8 : off+8+nl])
					if name != "." && name != ".." {
						if name == "" || path.Base(name) != name {
							return nil, fmt.Errorf("%w: directory inode %d: bad name %q", ErrNotExt4, ino, name)
						}
						ents = append(ents, dirent{name, e, p[off+7]})
					}
				}
				off += rl
			}
		}
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].name < ents[j].name })
	return ents, nil
}
