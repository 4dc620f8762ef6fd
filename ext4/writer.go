package ext4

import (
	"encoding/binary"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// inode is the in-memory form of an inode, serialised at Close.
type inode struct {
	mode   uint16
	links  uint32
	uid    uint32
	gid    uint32
	flags  uint32
	mtime  int64
	size   uint64
	blocks uint64 // 4 KiB blocks, data and extent tree
	iblock [60]byte
	dir    *dirInfo
}

const (
	sIFREG = ondisk.ModeReg
	sIFDIR = ondisk.ModeDir
	sIFLNK = ondisk.ModeSymlink

	flagIndex   = ondisk.InodeFlagIndex
	flagExtents = ondisk.InodeFlagExtents

	linkMax = 65000
)

// fileState tracks the regular file whose data Write receives.
type fileState struct {
	remaining int64
	runs      []blockRange
	ri        int
	next      uint64 // next physical block
	partial   []byte
}

// Writer writes an ext4 image. Call WriteHeader for each entry (parents
// before children), Write for a regular file's data, then Close. Errors are
// sticky.
type Writer struct {
	dst      io.WriterAt
	opts     Options
	g        *geometry
	alloc    *allocator
	csumSeed uint32
	hashSeed [4]uint32
	inodes   []inode // index ino-1
	paths    map[string]uint32
	dirs     []*dirInfo // in inode order
	cur      *fileState
	err      error
	closed   bool
	fixed    uint64 // blocks of journal (and its tree) and lost+found

	units     map[string]*unitState
	unitOrder []string
	cu        *unitState   // the current unit
	inoAvoid  []blockRange // inodes of previous units, sorted
	inoCursor uint64       // the next fresh inode candidate
	inoRI     int
	ninodes   uint64 // inodes handed out beyond the reserved ones
	ibitmaps  [][]byte
}

// NewWriter starts an image on dst, which must read as zeros (a fresh or
// sparse file): blocks that stay zero are never written.
func NewWriter(dst io.WriterAt, opts Options) (*Writer, error) {
	g, err := newGeometry(opts)
	if err != nil {
		return nil, err
	}
	keptBlocks, keptInodes, err := keptRanges(g, opts.Previous)
	if err != nil {
		return nil, err
	}
	w := &Writer{
		dst:       dst,
		opts:      opts,
		g:         g,
		alloc:     newAllocator(g, keptBlocks),
		csumSeed:  ondisk.CRC32C(^uint32(0), opts.UUID[:]),
		paths:     make(map[string]uint32),
		units:     make(map[string]*unitState),
		inoAvoid:  keptInodes,
		inoCursor: firstIno + 1,
	}
	w.cu = w.unit("")
	for i := range w.hashSeed {
		w.hashSeed[i] = binary.LittleEndian.Uint32(opts.HashSeed[4*i:])
	}
	w.inodes = make([]inode, firstIno)
	root := &w.inodes[rootIno-1]
	root.mode = sIFDIR | 0o755
	root.mtime = opts.Time
	root.dir = &dirInfo{ino: rootIno, parent: rootIno, unit: w.cu}
	w.dirs = append(w.dirs, root.dir)
	w.paths["."] = rootIno

	// The journal comes first, right after group 0's metadata.
	if err := w.makeJournal(); err != nil {
		return nil, err
	}
	lf := &w.inodes[lostFoundIno-1]
	lf.mode = sIFDIR | 0o700
	lf.mtime = opts.Time
	lf.dir = &dirInfo{ino: lostFoundIno, parent: rootIno, unit: w.cu}
	w.dirs = append(w.dirs, lf.dir)
	root.dir.entries = append(root.dir.entries, dirent{"lost+found", lostFoundIno, ftDir})
	root.dir.subdirs++
	w.paths["lost+found"] = lostFoundIno
	w.fixed += lostFoundBlocks
	return w, nil
}

func (w *Writer) makeJournal() error {
	n := uint64(w.g.journal)
	runs, err := w.allocBlocks(n)
	if err != nil {
		return err
	}
	j := &w.inodes[journalIno-1]
	j.mode = sIFREG | 0o600
	j.links = 1
	j.mtime = w.opts.Time
	j.size = n * blockSize
	j.flags = flagExtents
	tb, err := w.extentTree(&j.iblock, journalIno, runsToExtents(runs, 0))
	if err != nil {
		return err
	}
	j.blocks = n + tb
	w.fixed += n + tb
	sb := make([]byte, blockSize)
	be := binary.BigEndian
	be.PutUint32(sb[0x0:], ondisk.JournalMagic)
	be.PutUint32(sb[0x4:], 4) // JBD2_SUPERBLOCK_V2
	be.PutUint32(sb[0xC:], blockSize)
	be.PutUint32(sb[0x10:], uint32(n))
	be.PutUint32(sb[0x14:], 1) // s_first
	be.PutUint32(sb[0x18:], 1) // s_sequence
	copy(sb[0x30:], w.opts.UUID[:])
	be.PutUint32(sb[0x40:], 1) // s_nr_users
	return w.writeBlock(runs[0].start, sb)
}

// inodeSeed is the checksum seed of inode ino (generation 0).
func (w *Writer) inodeSeed(ino uint32) uint32 {
	return ondisk.InodeSeed(w.csumSeed, ino, 0)
}

// writeBlock writes one block unless it is all zero.
func (w *Writer) writeBlock(blk uint64, b []byte) error {
	if zeros.All(b) {
		return nil
	}
	_, err := w.dst.WriteAt(b, int64(blk)*blockSize)
	return err
}

// writeRun writes whole blocks starting at blk, skipping all-zero blocks.
func (w *Writer) writeRun(blk uint64, p []byte) error {
	n := len(p) / blockSize
	for i := 0; i < n; {
		if zeros.All(p[i*blockSize : (i+1)*blockSize]) {
			i++
			continue
		}
		j := i + 1
		for j < n && !zeros.All(p[j*blockSize:(j+1)*blockSize]) {
			j++
		}
		if _, err := w.dst.WriteAt(p[i*blockSize:j*blockSize], int64(blk+uint64(i))*blockSize); err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return w.err
}

// cleanName turns a header name into the key used for lookups.
func cleanName(name string) (string, error) {
	n := strings.TrimLeft(name, "/")
	n = path.Clean(n)
	if n == "" || n == "/" {
		n = "."
	}
	if n == ".." || strings.HasPrefix(n, "../") {
		return "", fmt.Errorf("%w: name %q leaves the root", ErrInvalidHeader, name)
	}
	if n != "." {
		for _, c := range strings.Split(n, "/") {
			if len(c) > 255 {
				return "", fmt.Errorf("%w: name %q has a component of %d bytes, want at most 255", ErrInvalidHeader, name, len(c))
			}
			if strings.IndexByte(c, 0) >= 0 {
				return "", fmt.Errorf("%w: name %q contains NUL", ErrInvalidHeader, name)
			}
		}
	}
	return n, nil
}

func (w *Writer) finishFile() error {
	if w.cur == nil {
		return nil
	}
	if w.cur.remaining > 0 {
		return fmt.Errorf("%w: %d bytes missing", ErrMissingData, w.cur.remaining)
	}
	w.cur = nil
	return nil
}

func fileType(mode uint16) uint8 {
	switch mode & 0xF000 {
	case sIFDIR:
		return ftDir
	case sIFLNK:
		return ftSymlink
	}
	return ftReg
}

// nextEntry ends the file being written, if any, before the next header
// or unit; it fails after Close or an earlier error.
func (w *Writer) nextEntry() error {
	if w.closed {
		return ErrWriteAfterClose
	}
	if w.err != nil {
		return w.err
	}
	if err := w.finishFile(); err != nil {
		return w.fail(err)
	}
	return nil
}

// WriteHeader adds an entry. Its parent directory must exist already. For a
// regular file, Write must then receive exactly h.Size bytes.
func (w *Writer) WriteHeader(h *Header) error {
	if err := w.nextEntry(); err != nil {
		return err
	}
	if err := w.writeHeader(h); err != nil {
		return w.fail(err)
	}
	return nil
}

func (w *Writer) writeHeader(h *Header) error {
	name, err := cleanName(h.Name)
	if err != nil {
		return err
	}
	if h.Mode&^0o7777 != 0 {
		return fmt.Errorf("%w: %s: mode %#o has bits beyond 07777", ErrInvalidHeader, h.Name, h.Mode)
	}
	if ino, ok := w.paths[name]; ok {
		// The root and lost+found exist already: a directory header sets
		// their attributes.
		if h.Type == TypeDir && (ino == rootIno || ino == lostFoundIno) {
			in := &w.inodes[ino-1]
			in.mode = sIFDIR | uint16(h.Mode)
			in.uid, in.gid, in.mtime = h.Uid, h.Gid, h.Mtime
			return nil
		}
		return fmt.Errorf("%w: %s", ErrExist, h.Name)
	}
	if name == "." {
		return fmt.Errorf("%w: the root must be a directory, got %v", ErrInvalidHeader, h.Type)
	}
	dirName := path.Dir(name)
	pino, ok := w.paths[dirName]
	if !ok {
		return fmt.Errorf("%w: parent directory %q of %s", ErrNotExist, dirName, h.Name)
	}
	parent := w.inodes[pino-1].dir
	if parent == nil {
		return fmt.Errorf("%w: parent %q of %s", ErrNotDir, dirName, h.Name)
	}
	var e dirent
	if h.Type == TypeLink {
		e, err = w.link(h)
	} else {
		e, err = w.create(h, pino, parent)
	}
	if err != nil {
		return err
	}
	e.name = path.Base(name)
	parent.entries = append(parent.entries, e)
	w.paths[name] = e.ino
	return nil
}

// link adds a link to the inode of the earlier file h.Linkname.
func (w *Writer) link(h *Header) (dirent, error) {
	target, err := cleanName(h.Linkname)
	if err != nil {
		return dirent{}, err
	}
	tino, ok := w.paths[target]
	if !ok {
		return dirent{}, fmt.Errorf("%w: hard link target %q of %s", ErrNotExist, h.Linkname, h.Name)
	}
	t := &w.inodes[tino-1]
	if t.dir != nil || tino < firstIno {
		return dirent{}, fmt.Errorf("%w: hard link %s to directory %q", ErrInvalidHeader, h.Name, h.Linkname)
	}
	if t.links >= linkMax {
		return dirent{}, fmt.Errorf("%w: %q has %d links, want at most %d", ErrTooLarge, h.Linkname, t.links, linkMax)
	}
	t.links++
	return dirent{ino: tino, ftype: fileType(t.mode)}, nil
}

// create makes the inode of a new directory, file or symlink in directory
// parent (inode pino).
func (w *Writer) create(h *Header, pino uint32, parent *dirInfo) (dirent, error) {
	ino, in, err := w.newInode()
	if err != nil {
		return dirent{}, err
	}
	in.uid, in.gid, in.mtime = h.Uid, h.Gid, h.Mtime
	in.links = 1
	perm := uint16(h.Mode)
	switch h.Type {
	case TypeDir:
		in.mode = sIFDIR | perm
		in.dir = &dirInfo{ino: ino, parent: pino, unit: w.cu}
		w.dirs = append(w.dirs, in.dir)
		parent.subdirs++
		return dirent{ino: ino, ftype: ftDir}, nil
	case TypeReg:
		in.mode = sIFREG | perm
		return dirent{ino: ino, ftype: ftReg}, w.createFile(h, ino, in)
	case TypeSymlink:
		in.mode = sIFLNK | 0o777
		return dirent{ino: ino, ftype: ftSymlink}, w.createSymlink(h, ino, in)
	}
	return dirent{}, fmt.Errorf("%w: %s: unknown type %v", ErrInvalidHeader, h.Name, h.Type)
}

// createFile allocates the blocks of a regular file, which Write fills.
func (w *Writer) createFile(h *Header, ino uint32, in *inode) error {
	if h.Size < 0 {
		return fmt.Errorf("%w: %s: size %d is negative", ErrInvalidHeader, h.Name, h.Size)
	}
	in.flags = flagExtents
	in.size = uint64(h.Size)
	n := (in.size + blockSize - 1) / blockSize
	if n > 1<<32-1 {
		return fmt.Errorf("%w: %s: %d bytes", ErrTooLarge, h.Name, h.Size)
	}
	var runs []blockRange
	if n > 0 {
		var err error
		if runs, err = w.allocBlocks(n); err != nil {
			return err
		}
	}
	tb, err := w.extentTree(&in.iblock, ino, runsToExtents(runs, 0))
	if err != nil {
		return err
	}
	in.blocks = n + tb
	if n > 0 {
		w.cur = &fileState{remaining: h.Size, runs: runs, next: runs[0].start}
	}
	return nil
}

// createSymlink stores a symlink's target: in the inode when shorter than
// 60 bytes, else in a block of its own.
func (w *Writer) createSymlink(h *Header, ino uint32, in *inode) error {
	l := len(h.Linkname)
	if l == 0 || l >= blockSize || strings.IndexByte(h.Linkname, 0) >= 0 {
		return fmt.Errorf("%w: %s: symlink target of %d bytes, want 1 to %d without NUL", ErrInvalidHeader, h.Name, l, blockSize-1)
	}
	in.size = uint64(l)
	if l < 60 {
		copy(in.iblock[:], h.Linkname)
		return nil
	}
	runs, err := w.allocBlocks(1)
	if err != nil {
		return err
	}
	in.flags = flagExtents
	if _, err := w.extentTree(&in.iblock, ino, runsToExtents(runs, 0)); err != nil {
		return err
	}
	in.blocks = 1
	b := make([]byte, blockSize)
	copy(b, h.Linkname)
	return w.writeBlock(runs[0].start, b)
}

// Write writes data of the current regular file.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, ErrWriteAfterClose
	}
	if w.err != nil {
		return 0, w.err
	}
	var rem int64
	if w.cur != nil {
		rem = w.cur.remaining
	}
	tooLong := false
	if int64(len(p)) > rem {
		p = p[:rem]
		tooLong = true
	}
	var n int
	var err error
	if len(p) > 0 {
		n, err = w.write(p)
	}
	if err != nil {
		return n, w.fail(err)
	}
	if tooLong {
		return n, w.fail(fmt.Errorf("%w: more than the header's size", ErrWriteTooLong))
	}
	return n, nil
}

func (w *Writer) write(p []byte) (int, error) {
	f := w.cur
	total := len(p)
	if len(f.partial) > 0 {
		k := min(len(p), blockSize-len(f.partial))
		f.partial = append(f.partial, p[:k]...)
		p = p[k:]
		f.remaining -= int64(k)
		if len(f.partial) == blockSize {
			if err := w.flushBlocks(f.partial); err != nil {
				return total - len(p), err
			}
			f.partial = f.partial[:0]
		}
	}
	for len(p) >= blockSize {
		run := f.runs[f.ri]
		k := min(uint64(len(p)/blockSize), run.end()-f.next)
		chunk := p[:k*blockSize]
		if err := w.flushBlocks(chunk); err != nil {
			return total - len(p), err
		}
		p = p[len(chunk):]
		f.remaining -= int64(len(chunk))
	}
	if len(p) > 0 {
		if f.partial == nil {
			f.partial = make([]byte, 0, blockSize)
		}
		f.partial = append(f.partial, p...)
		f.remaining -= int64(len(p))
	}
	if f.remaining == 0 && len(f.partial) > 0 {
		b := f.partial[:blockSize]
		clear(b[len(f.partial):])
		if err := w.flushBlocks(b); err != nil {
			return total, err
		}
		f.partial = f.partial[:0]
	}
	return total, nil
}

// flushBlocks writes whole blocks at the file's next physical blocks; they
// lie within the current run.
func (w *Writer) flushBlocks(b []byte) error {
	f := w.cur
	k := uint64(len(b) / blockSize)
	if err := w.writeRun(f.next, b); err != nil {
		return err
	}
	f.next += k
	if f.next == f.runs[f.ri].end() && f.ri+1 < len(f.runs) {
		f.ri++
		f.next = f.runs[f.ri].start
	}
	return nil
}

// Usage returns what the tree written so far uses, in the terms of
// MinSize: inodes beyond the reserved ones and blocks beyond the fixed
// metadata, journal and lost+found. Directory blocks are counted after Close.
func (w *Writer) Usage() Usage {
	return Usage{Inodes: w.ninodes, Blocks: w.alloc.nused - w.fixed}
}

// Close writes the directories, inodes, bitmaps, group descriptors and
// superblocks. It does not close the destination.
func (w *Writer) Close() error {
	if w.closed {
		return ErrWriteAfterClose
	}
	if w.err != nil {
		w.closed = true
		return w.err
	}
	err := w.finishFile()
	if err == nil {
		err = w.finish()
	}
	w.closed = true
	if err != nil {
		return w.fail(err)
	}
	return nil
}
