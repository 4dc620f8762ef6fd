package push

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/nixvm-image/nixvm-image/qcow"
	"golang.org/x/sys/unix"
)

// DefaultStoreDir is where a host keeps its images.
const DefaultStoreDir = "/var/lib/nixvm-image/images"

var (
	// ErrName reports an image name that is not one plain path element.
	ErrName = errors.New("push: bad image name")
	// ErrBusy reports that another push to the same name holds its lock.
	ErrBusy = errors.New("push: image name is locked by another push")
	// ErrDigest reports that the written image does not have the sender's digest.
	ErrDigest = errors.New("push: digest mismatch")
)

// Store is a host's image store:
//
//	Dir/<name>/<digest>.qcow2   immutable generations (mode 0444), uncompressed sparse qcow2
//	Dir/<name>/<digest>.qcow2.manifest  their block hashes (manifest format), written with the image
//	Dir/<name>/current          symlink to the current generation, swapped atomically
//	Dir/<name>/.lock            flock'ed by the push in progress
//	Dir/<name>/.partial/        the generation being received and its progress record
type Store struct {
	Dir string // "" means DefaultStoreDir
}

func (s *Store) dir() string {
	if s.Dir == "" {
		return DefaultStoreDir
	}
	return s.Dir
}

func digestHex(d [32]byte) string { return hex.EncodeToString(d[:]) }

func parseGenFile(name string) ([32]byte, bool) {
	var d [32]byte
	hexd, ok := strings.CutSuffix(name, ".qcow2")
	if !ok || len(hexd) != 64 || strings.ToLower(hexd) != hexd {
		return d, false
	}
	if _, err := hex.Decode(d[:], []byte(hexd)); err != nil {
		return d, false
	}
	return d, true
}

// Names lists the image names in the store.
func (s *Store) Names() ([]string, error) {
	ents, err := os.ReadDir(s.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		if e.IsDir() && ValidName(e.Name()) == nil {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// List returns the complete generations of name (each with its index), the
// current one first, then newest first.
func (s *Store) List(name string) ([]Generation, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	dir := filepath.Join(s.dir(), name)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	cur, _ := os.Readlink(filepath.Join(dir, "current"))
	type gm struct {
		g Generation
		t int64
	}
	var gens []gm
	for _, e := range ents {
		d, ok := parseGenFile(e.Name())
		if !ok {
			continue
		}
		p := filepath.Join(dir, e.Name())
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		size, err := indexSize(p + ".manifest")
		if err != nil {
			continue // an interrupted commit; never offered
		}
		gens = append(gens, gm{Generation{Name: name, Digest: d, VirtualSize: size, Current: cur == e.Name(), Path: p}, fi.ModTime().UnixNano()})
	}
	sort.SliceStable(gens, func(i, j int) bool {
		if gens[i].g.Current != gens[j].g.Current {
			return gens[i].g.Current
		}
		return gens[i].t > gens[j].t
	})
	out := make([]Generation, len(gens))
	for i := range gens {
		out[i] = gens[i].g
	}
	return out, nil
}

// indexSize reads (and so validates) a generation's index.
func indexSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, _, _, err := readIndex(bufio.NewReaderSize(f, 1<<20))
	return size, err
}

func (s *Store) loadIndex(g Generation) ([]Hash, error) {
	f, err := os.Open(g.Path + ".manifest")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	_, blocks, d, err := readIndex(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, err
	}
	if d != g.Digest {
		return nil, fmt.Errorf("%w: index of %s has digest %x", ErrIndex, g.Path, d)
	}
	return blocks, nil
}

// lock takes the name's lock without waiting.
func (s *Store) lock(name string) (func(), error) {
	dir := filepath.Join(s.dir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: another push to %q is in progress on this host (it holds %s); try again when it has finished", ErrBusy, name, p)
		}
		return nil, fmt.Errorf("push: locking %s: %w", p, err)
	}
	return func() { f.Close() }, nil
}

// activate points current (and link, if set) at generation d.
func (s *Store) activate(name string, d [32]byte, link string) error {
	dir := filepath.Join(s.dir(), name)
	file := digestHex(d) + ".qcow2"
	if err := replaceSymlink(file, filepath.Join(dir, "current")); err != nil {
		return err
	}
	if link != "" {
		abs, err := filepath.Abs(filepath.Join(dir, file))
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			return fmt.Errorf("push: --link %s: %w", link, err)
		}
		if err := replaceSymlink(abs, link); err != nil {
			return fmt.Errorf("push: --link %s: %w", link, err)
		}
	}
	return nil
}

// replaceSymlink atomically makes path a symlink to target.
func replaceSymlink(target, path string) error {
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// partial is a generation being received.
type partial struct {
	dir     string // Dir/<name>/.partial
	digest  [32]byte
	size    int64
	n       int64
	raw     *os.File
	hashesF *os.File
	hashes  []Hash
	next    int64 // blocks below next are applied
	synced  int64 // hashes below synced are in hashesF
	missing map[int64]bool
	fixed   []int64 // missing blocks filled since the last checkpoint
}

type progressRecord struct {
	Next    int64   `json:"next"`
	Missing []int64 `json:"missing,omitempty"`
}

// openPartial opens or starts the partial generation for digest; a partial
// of another digest is discarded.
func (s *Store) openPartial(name string, digest [32]byte, size int64) (*partial, error) {
	dir := filepath.Join(s.dir(), name, ".partial")
	hx := digestHex(digest)
	if ents, err := os.ReadDir(dir); err == nil {
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), hx+".") {
				os.RemoveAll(filepath.Join(dir, e.Name()))
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &partial{dir: dir, digest: digest, size: size, n: blockCount(size), missing: map[int64]bool{}}
	base := filepath.Join(dir, hx)
	var rec progressRecord
	if b, err := os.ReadFile(base + ".progress"); err == nil {
		if json.Unmarshal(b, &rec) != nil || rec.Next < 0 || rec.Next > p.n {
			rec = progressRecord{}
		}
	}
	var err error
	if p.raw, err = os.OpenFile(base+".raw", os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, err
	}
	if p.hashesF, err = os.OpenFile(base+".hashes", os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		p.close()
		return nil, err
	}
	p.hashes = make([]Hash, p.n)
	if rec.Next > 0 {
		buf := make([]byte, rec.Next*16)
		if _, err := p.hashesF.ReadAt(buf, 0); err != nil {
			rec = progressRecord{}
		} else {
			for i := range rec.Next {
				copy(p.hashes[i][:], buf[i*16:])
			}
		}
	}
	for _, m := range rec.Missing {
		if m >= 0 && m < rec.Next {
			p.missing[m] = true
			p.hashes[m] = Hash{}
		}
	}
	p.next, p.synced = rec.Next, rec.Next
	// Everything past the checkpoint reads as zeros again.
	if err := p.raw.Truncate(min(p.next*BlockSize, size)); err != nil {
		p.close()
		return nil, err
	}
	if err := p.raw.Truncate(size); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

func (p *partial) close() {
	if p.raw != nil {
		p.raw.Close()
	}
	if p.hashesF != nil {
		p.hashesF.Close()
	}
}

// checkpoint makes everything applied so far durable.
func (p *partial) checkpoint() error {
	if err := p.raw.Sync(); err != nil {
		return err
	}
	if p.next > p.synced {
		buf := make([]byte, 0, (p.next-p.synced)*16)
		for i := p.synced; i < p.next; i++ {
			buf = append(buf, p.hashes[i][:]...)
		}
		if _, err := p.hashesF.WriteAt(buf, p.synced*16); err != nil {
			return err
		}
	}
	// Re-sent literals fill missing blocks below synced.
	for _, i := range p.fixed {
		if i < p.synced {
			if _, err := p.hashesF.WriteAt(p.hashes[i][:], i*16); err != nil {
				return err
			}
		}
	}
	p.fixed = p.fixed[:0]
	if err := p.hashesF.Sync(); err != nil {
		return err
	}
	p.synced = p.next
	rec := progressRecord{Next: p.next}
	for m := range p.missing {
		rec.Missing = append(rec.Missing, m)
	}
	sort.Slice(rec.Missing, func(i, j int) bool { return rec.Missing[i] < rec.Missing[j] })
	b, _ := json.Marshal(rec)
	return writeFileAtomic(filepath.Join(p.dir, digestHex(p.digest)+".progress"), b, 0o600)
}

// writeBlocks stores data (whole blocks, the last may run past the end) at block start.
func (p *partial) writeBlocks(start int64, data []byte) error {
	off := start * BlockSize
	if end := off + int64(len(data)); end > p.size {
		data = data[:p.size-off]
	}
	_, err := p.raw.WriteAt(data, off)
	return err
}

func (p *partial) readBlocks(start int64, buf []byte) error {
	off := start * BlockSize
	n := len(buf)
	if end := off + int64(n); end > p.size {
		n = int(p.size - off)
		clear(buf[n:])
	}
	_, err := p.raw.ReadAt(buf[:n], off)
	return noEOF(err)
}

// commit turns the verified partial into generation digest: index and
// qcow2 written beside it with temp+fsync+rename, then the partial removed.
// It re-reads the raw data once and checks every block against its hash on
// the way into the qcow2 file.
func (s *Store) commit(name string, p *partial) (err error) {
	dir := filepath.Join(s.dir(), name)
	base := filepath.Join(dir, digestHex(p.digest))

	idx := base + ".qcow2.manifest"
	tmpIdx := filepath.Join(p.dir, "index.tmp")
	if err := writeFileWith(tmpIdx, 0o444, func(w io.Writer) error { return writeIndex(w, p.size, p.hashes) }); err != nil {
		return err
	}
	tmpImg := filepath.Join(p.dir, "image.tmp")
	defer os.Remove(tmpImg)
	defer os.Remove(tmpIdx)
	f, err := os.OpenFile(tmpImg, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	qw, err := qcow.NewWriter(f, p.size, qcow.Options{Compression: qcow.None})
	if err != nil {
		return err
	}
	buf := make([]byte, 256*BlockSize)
	for b := int64(0); b < p.n; b += 256 {
		cnt := min(256, p.n-b)
		allZero := true
		for i := b; i < b+cnt; i++ {
			if p.hashes[i] != ZeroHash {
				allZero = false
			}
		}
		if allZero {
			continue
		}
		chunk := buf[:cnt*BlockSize]
		if err := p.readBlocks(b, chunk); err != nil {
			return err
		}
		for i := int64(0); i < cnt; i++ {
			if got := hashBlock(chunk[i*BlockSize : (i+1)*BlockSize]); got != p.hashes[b+i] {
				return fmt.Errorf("%w: block %d of the received image changed on disk before commit: got %x, want %x", ErrDigest, b+i, got, p.hashes[b+i])
			}
		}
		n := min(int64(len(chunk)), p.size-b*BlockSize)
		if _, err := qw.WriteAt(chunk[:n], b*BlockSize); err != nil {
			return err
		}
	}
	if err := qw.Close(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Chmod(0o444); err != nil {
		return err
	}
	if err := os.Rename(tmpIdx, idx); err != nil {
		return err
	}
	if err := os.Rename(tmpImg, base+".qcow2"); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	p.close()
	return os.RemoveAll(p.dir)
}

// discard drops the partial (after a digest mismatch: start over next time).
func (p *partial) discard() {
	p.close()
	os.RemoveAll(p.dir)
}

func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	return writeFileWith(path, mode, func(w io.Writer) error { _, err := w.Write(b); return err })
}

func writeFileWith(path string, mode os.FileMode, fill func(io.Writer) error) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	err = fill(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// genReader reads a stored generation.
type genReader struct {
	f   *os.File
	img image.Image
}

func openGen(path string) (*genReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("push: opening %s: %w", path, err)
	}
	return &genReader{f, img}, nil
}

func (g *genReader) readBlocks(start int64, buf []byte) error {
	off := start * BlockSize
	n := len(buf)
	if end := off + int64(n); end > g.img.Size() {
		n = int(max(0, g.img.Size()-off))
		clear(buf[n:])
	}
	_, err := g.img.ReadAt(buf[:n], off)
	if err == io.EOF {
		err = nil
	}
	return err
}

func (g *genReader) Close() error {
	g.img.Close()
	return g.f.Close()
}
