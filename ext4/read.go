package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
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
	p := &placer{rd: rd, unit: unit, units: map[string]*unitState{}}
	root := p.get("")
	if err := rd.fileBlocks(journalIno, root.addBlocks); err != nil {
		return Options{}, nil, fmt.Errorf("journal: %w", err)
	}
	p.dirs = append(p.dirs, dirRef{root, rootIno}, dirRef{root, lostFoundIno})
	p.seen = map[uint32]bool{rootIno: true, lostFoundIno: true, journalIno: true}
	if err := p.walk(rootIno, ".", 0); err != nil {
		return Options{}, nil, err
	}
	// Directory blocks come last in each unit, in the order the
	// directories were made: the Writer allocates them at Close.
	for _, d := range p.dirs {
		if err := rd.fileBlocks(d.ino, d.u.addBlocks); err != nil {
			return Options{}, nil, fmt.Errorf("directory inode %d: %w", d.ino, err)
		}
	}
	ps := make(map[string]Placement, len(p.units))
	for n, u := range p.units {
		ps[n] = u.rep
	}
	return opts, ps, nil
}

// placer assigns what a tree uses to units, the way the Writer did.
type placer struct {
	rd    *reader
	unit  func(name string) string
	units map[string]*unitState
	dirs  []dirRef // in the order the Writer made them
	seen  map[uint32]bool
}

type dirRef struct {
	u   *unitState
	ino uint32
}

func (p *placer) get(name string) *unitState {
	u := p.units[name]
	if u == nil {
		u = &unitState{name: name}
		p.units[name] = u
	}
	return u
}

func (u *unitState) addBlocks(rs []blockRange) {
	for _, r := range rs {
		u.rep.Blocks = appendRange(u.rep.Blocks, r)
	}
}

// walk places the entries of directory dino (named dname), depth first in
// name order.
func (p *placer) walk(dino uint32, dname string, depth int) error {
	if depth > 4096 {
		return fmt.Errorf("%w: directories nested deeper than 4096", ErrNotExt4)
	}
	ents, err := p.rd.readDir(dino)
	if err != nil {
		return fmt.Errorf("directory %q: %w", dname, err)
	}
	for _, e := range ents {
		if e.ino == lostFoundIno && dino == rootIno {
			continue
		}
		name := e.name
		if dname != "." {
			name = dname + "/" + e.name
		}
		if err := p.entry(e, name, depth); err != nil {
			return err
		}
	}
	return nil
}

// entry places one directory entry: its inode, and its blocks or, for a
// directory, its subtree.
func (p *placer) entry(e dirent, name string, depth int) error {
	if p.seen[e.ino] {
		if e.ftype == ftDir {
			return fmt.Errorf("%w: directory %q (inode %d) linked twice", ErrNotExt4, name, e.ino)
		}
		return nil // a hard link: the first name owns the inode
	}
	p.seen[e.ino] = true
	u := p.get(p.unit(name))
	if e.ino <= lostFoundIno || uint64(e.ino) > p.rd.inodes {
		return fmt.Errorf("%w: %q has inode %d", ErrNotExt4, name, e.ino)
	}
	u.rep.Inodes = appendRange(u.rep.Inodes, blockRange{uint64(e.ino), 1})
	in, err := p.rd.inode(e.ino)
	if err != nil {
		return err
	}
	if in.mode&0xF000 == sIFDIR {
		p.dirs = append(p.dirs, dirRef{u, e.ino})
		return p.walk(e.ino, name, depth+1)
	}
	if err := p.rd.fileBlocks(e.ino, u.addBlocks); err != nil {
		return fmt.Errorf("%q: %w", name, err)
	}
	return nil
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

// super reads the superblock and the group descriptors, checks that the
// Writer could have made them and returns the Options they hold.
func (rd *reader) super() (Options, error) {
	s, err := ondisk.ReadSuperblock(rd.r)
	if err != nil {
		return Options{}, fmt.Errorf("%w: %w", ErrNotExt4, err)
	}
	if err := rd.geometry(s); err != nil {
		return Options{}, err
	}
	o := Options{Size: int64(rd.blocks) * blockSize, Time: int64(s.Wtime), UUID: s.UUID, HashSeed: s.HashSeed}
	label := s.VolumeName[:]
	if i := bytes.IndexByte(label, 0); i >= 0 {
		label = label[:i]
	}
	o.Label = string(label)
	rd.itable = make([]uint64, s.Groups())
	for gi := range rd.itable {
		d, err := ondisk.ReadGroupDesc(rd.r, s, uint32(gi))
		if err != nil {
			return Options{}, fmt.Errorf("%w: %w", ErrNotExt4, err)
		}
		rd.itable[gi] = d.InodeTable
	}
	return o, nil
}

// geometry checks the superblock's geometry against the Writer's and keeps
// it.
func (rd *reader) geometry(s *ondisk.Superblock) error {
	if s.LogBlockSize != 2 {
		return fmt.Errorf("%w: block size: got %d, want 4096", ErrNotExt4, s.BlockSize())
	}
	const want = ondisk.Incompat64bit | ondisk.IncompatExtents
	if s.FeatureIncompat&want != want || s.DescSize != descSize {
		return fmt.Errorf("%w: want 64bit descriptors of %d bytes and extents, got features %#x", ErrNotExt4, descSize, s.FeatureIncompat)
	}
	rd.blocks, rd.ipg, rd.inodeSize = s.BlocksCount, s.InodesPerGroup, uint32(s.InodeSize)
	if s.BlocksPerGroup != blocksPerGrp || s.FirstDataBlock != 0 || rd.ipg == 0 || rd.ipg > blocksPerGrp ||
		rd.inodeSize < 128 || rd.inodeSize > blockSize || rd.blocks == 0 || rd.blocks > maxBlocks {
		return fmt.Errorf("%w: geometry: %d blocks from %d, %d per group, %d inodes per group of %d bytes",
			ErrNotExt4, rd.blocks, s.FirstDataBlock, s.BlocksPerGroup, rd.ipg, rd.inodeSize)
	}
	rd.inodes = s.Groups() * uint64(rd.ipg)
	if uint64(s.InodesCount) != rd.inodes {
		return fmt.Errorf("%w: inode count: got %d, want %d", ErrNotExt4, s.InodesCount, rd.inodes)
	}
	return nil
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
	w := ondisk.ExtentWalk{
		Read: func(n uint64) ([]byte, error) {
			b, err := rd.readBlock(n)
			return bytes.Clone(b), err
		},
		Extent: func(e ondisk.Extent) error {
			l := e.Blocks() // unwritten extents are allocated too
			if l == 0 || e.Start >= rd.blocks || l > rd.blocks-e.Start {
				return fmt.Errorf("%w: inode %d: extent %d+%d", ErrNotExt4, ino, e.Start, l)
			}
			data = appendRun(data, blockRange{e.Start, l})
			return nil
		},
		Node: func(n uint64, depth int, _ []byte) error {
			levels[depth] = appendRun(levels[depth], blockRange{n, 1})
			return nil
		},
	}
	if err := w.Walk(in.iblock[:]); err != nil {
		if errors.Is(err, ondisk.ErrCorrupt) {
			return fmt.Errorf("%w: inode %d: %w", ErrNotExt4, ino, err)
		}
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
