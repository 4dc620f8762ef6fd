package ext4

import (
	"encoding/binary"
	"path"
)

// Planner computes the Usage of a tree from its headers alone, before any
// data is read, so that a caller can size the image with MinSize first.
// Directory blocks are counted exactly (the same packing and hash order as
// the Writer, hence the hash seed); extent tree blocks are an upper bound,
// so the Usage is at least what a Writer reports for the same headers.
type Planner struct {
	hashSeed [4]uint32
	u        Usage
	dirs     map[string]*dirInfo
	order    []*dirInfo
	seen     map[string]bool
}

// NewPlanner returns a Planner for images built with opts (only
// opts.HashSeed matters).
func NewPlanner(opts Options) *Planner {
	p := &Planner{dirs: map[string]*dirInfo{}, seen: map[string]bool{}}
	for i := range p.hashSeed {
		p.hashSeed[i] = binary.LittleEndian.Uint32(opts.HashSeed[4*i:])
	}
	root := &dirInfo{ino: rootIno, parent: rootIno}
	root.entries = append(root.entries, dirent{"lost+found", lostFoundIno, ftDir})
	p.dirs["."] = root
	p.order = append(p.order, root)
	p.seen["."], p.seen["lost+found"] = true, true
	return p
}

// extentBound is an upper bound of the extents of n contiguous-as-possible
// blocks: runs of 32768 blocks, plus a split where a run meets a group's
// metadata.
func extentBound(n uint64) int {
	if n == 0 {
		return 0
	}
	return int(2*((n+maxExtentLen-1)/maxExtentLen) + 1)
}

// Add accounts for one header. Headers the Writer would reject are counted
// as well as they can be; the Writer reports the error.
func (p *Planner) Add(h *Header) {
	name, err := cleanName(h.Name)
	if err != nil || p.seen[name] {
		return
	}
	parent := p.dirs[path.Dir(name)]
	if parent == nil {
		return
	}
	p.seen[name] = true
	base := path.Base(name)
	ft := uint8(ftReg)
	switch h.Type {
	case TypeLink:
		parent.entries = append(parent.entries, dirent{base, 0, ftReg})
		return
	case TypeDir:
		d := &dirInfo{}
		p.dirs[name] = d
		p.order = append(p.order, d)
		ft = ftDir
	case TypeReg:
		if h.Size > 0 {
			n := (uint64(h.Size) + blockSize - 1) / blockSize
			p.u.Blocks += n + treeBlocks(extentBound(n))
		}
	case TypeSymlink:
		ft = ftSymlink
		if len(h.Linkname) >= 60 {
			p.u.Blocks++
		}
	}
	p.u.Inodes++
	parent.entries = append(parent.entries, dirent{base, 0, ft})
}

// Usage returns the usage of the headers added so far.
func (p *Planner) Usage() Usage {
	u := p.u
	for _, d := range p.order {
		blocks, _, err := buildDir(d, 0, p.hashSeed)
		n := uint64(len(blocks))
		if err != nil {
			n = uint64(len(d.entries)) // cannot be built; any big number
		}
		u.Blocks += n + treeBlocks(extentBound(n))
	}
	return u
}
