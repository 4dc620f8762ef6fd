package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"github.com/nixvm-image/nixvm-image/manifest"
)

// Partial is a generation being received into Dir/<name>/.partial: the raw
// virtual disk, its block hashes so far and a progress record, so that a
// receive cut short resumes at its last Checkpoint. The receiver fills
// Hashes and the data (WriteBlocks) in block order and advances Next; blocks
// below Next whose data did not arrive go in Missing until they do (Fill).
// A Partial belongs to the Lock it was opened under.
type Partial struct {
	Digest [32]byte
	Size   int64 // virtual size in bytes
	// Hashes has one entry per block; those below Next are applied.
	Hashes []manifest.Hash
	// Next is the first block not yet applied.
	Next int64
	// Missing holds blocks below Next still to come.
	Missing map[int64]bool

	l       *Lock
	dir     string
	raw     *os.File
	hashesF *os.File
	synced  int64   // hashes below synced are in hashesF
	fixed   []int64 // missing blocks filled since the last checkpoint
}

// progressRecord is what a Checkpoint makes durable beside the hashes.
type progressRecord struct {
	Size    int64   `json:"size"` // the virtual size the hashes are of
	Next    int64   `json:"next"`
	Missing []int64 `json:"missing,omitempty"`
}

// OpenPartial opens the partial generation digest of size bytes, resuming
// from its last checkpoint, or starts it; a partial of another digest (or
// size) is discarded. The store must not hold digest yet: with another size
// it fails with ErrConflict.
func (l *Lock) OpenPartial(digest [32]byte, size int64) (*Partial, error) {
	if err := checkSize(size); err != nil {
		return nil, err
	}
	if _, ok, err := l.held(digest, size); ok || err != nil {
		if err == nil {
			err = fmt.Errorf("BUG: store: receiving generation %x of %q, which the store holds", digest[:8], l.name)
		}
		return nil, err
	}
	dir := filepath.Join(l.dir, ".partial")
	hx := digestHex(digest)
	if err := removeOtherPartials(dir, hx+"."); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &Partial{Digest: digest, Size: size, Missing: map[int64]bool{}, l: l, dir: dir,
		Hashes: make([]manifest.Hash, manifest.BlockCount(size))}
	if err := p.open(filepath.Join(dir, hx)); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// removeOtherPartials removes what dir holds besides files starting with keep.
func removeOtherPartials(dir, keep string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), keep) {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

// open opens the files at base.* and restores the last checkpoint.
func (p *Partial) open(base string) error {
	var err error
	if p.raw, err = os.OpenFile(base+".raw", os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return err
	}
	if p.hashesF, err = os.OpenFile(base+".hashes", os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return err
	}
	rec := p.restore(base + ".progress")
	p.Next, p.synced = rec.Next, rec.Next
	// Everything past the checkpoint reads as zeros again.
	if err := p.raw.Truncate(min(p.Next*manifest.BlockSize, p.Size)); err != nil {
		return err
	}
	return p.raw.Truncate(p.Size)
}

// restore loads the progress record and the hashes it covers; a damaged
// record or hash file means starting over.
func (p *Partial) restore(path string) progressRecord {
	var rec progressRecord
	b, err := os.ReadFile(path)
	if err != nil || json.Unmarshal(b, &rec) != nil || rec.Size != p.Size || rec.Next < 0 || rec.Next > p.Blocks() {
		return progressRecord{}
	}
	if rec.Next > 0 {
		buf := make([]byte, rec.Next*16)
		if _, err := p.hashesF.ReadAt(buf, 0); err != nil {
			return progressRecord{}
		}
		for i := range rec.Next {
			copy(p.Hashes[i][:], buf[i*16:])
		}
	}
	for _, m := range rec.Missing {
		if m >= 0 && m < rec.Next {
			p.Missing[m] = true
			p.Hashes[m] = manifest.Hash{}
		}
	}
	return rec
}

// Blocks is the number of blocks of the virtual disk.
func (p *Partial) Blocks() int64 { return int64(len(p.Hashes)) }

// Close releases the files; the partial stays on disk for the next receive.
func (p *Partial) Close() error {
	var errs []error
	for _, f := range []*os.File{p.raw, p.hashesF} {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	p.raw, p.hashesF = nil, nil
	return errors.Join(errs...)
}

// WriteBlocks stores data (whole blocks; the last may run past the disk's
// end) at block start.
func (p *Partial) WriteBlocks(start int64, data []byte) error {
	off := start * manifest.BlockSize
	if end := off + int64(len(data)); end > p.Size {
		data = data[:p.Size-off]
	}
	_, err := p.raw.WriteAt(data, off)
	return err
}

// ReadBlocks reads whole blocks from start; past the disk's end reads as zeros.
func (p *Partial) ReadBlocks(start int64, buf []byte) error {
	return readBlocksAt(p.raw, p.Size, start, buf)
}

// Fill records that missing block i arrived (its hash is in Hashes[i]).
func (p *Partial) Fill(i int64) {
	delete(p.Missing, i)
	p.fixed = append(p.fixed, i)
}

// Checkpoint makes everything applied so far durable: the data, the hashes
// below Next, and the progress record.
func (p *Partial) Checkpoint() error {
	if err := p.raw.Sync(); err != nil {
		return err
	}
	if err := p.syncHashes(); err != nil {
		return err
	}
	rec := progressRecord{Size: p.Size, Next: p.Next}
	for m := range p.Missing {
		rec.Missing = append(rec.Missing, m)
	}
	slices.Sort(rec.Missing)
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(p.dir, digestHex(p.Digest)+".progress"), b, 0o600)
}

// syncHashes writes the hashes applied since the last checkpoint, and those
// of missing blocks filled since, to the hash file and syncs it.
func (p *Partial) syncHashes() error {
	if p.Next > p.synced {
		buf := make([]byte, 0, (p.Next-p.synced)*16)
		for i := p.synced; i < p.Next; i++ {
			buf = append(buf, p.Hashes[i][:]...)
		}
		if _, err := p.hashesF.WriteAt(buf, p.synced*16); err != nil {
			return err
		}
	}
	for _, i := range p.fixed {
		if i < p.synced {
			if _, err := p.hashesF.WriteAt(p.Hashes[i][:], i*16); err != nil {
				return err
			}
		}
	}
	p.fixed = p.fixed[:0]
	if err := p.hashesF.Sync(); err != nil {
		return err
	}
	p.synced = p.Next
	return nil
}

// Commit installs the complete partial as generation Digest (Lock.Put
// reads the raw data once more and checks every block on its way into the
// qcow2 file) and removes the partial. It fails with ErrDigest, and
// discards the partial, when the hashes do not make Digest.
func (p *Partial) Commit() (Generation, error) {
	if p.Next != p.Blocks() || len(p.Missing) > 0 {
		return Generation{}, fmt.Errorf("BUG: store: commit of a partial at block %d of %d with %d missing", p.Next, p.Blocks(), len(p.Missing))
	}
	m := &manifest.Manifest{VirtualSize: p.Size, Blocks: p.Hashes, Digest: manifest.ComputeDigest(p.Hashes)}
	if m.Digest != p.Digest {
		return Generation{}, errors.Join(fmt.Errorf("%w: the received image has digest %x, want %x", ErrDigest, m.Digest, p.Digest), p.Discard())
	}
	g, err := p.l.Put(p.raw, m)
	if err != nil {
		return g, err
	}
	return g, p.Discard()
}

// Discard closes and removes the partial (after a digest mismatch: the next
// receive starts over).
func (p *Partial) Discard() error {
	return errors.Join(p.Close(), os.RemoveAll(p.dir))
}
