package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// receive applies blocks [from, to) of data to p as a receiver does.
func receive(t testing.TB, p *Partial, data []byte, from, to int64) {
	t.Helper()
	for i := from; i < to; i++ {
		blk := make([]byte, manifest.BlockSize)
		copy(blk, data[min(int(i*manifest.BlockSize), len(data)):])
		p.Hashes[i] = manifest.HashBlock(blk)
		if err := p.WriteBlocks(i, blk); err != nil {
			t.Fatal(err)
		}
	}
	p.Next = to
}

func openPartial(t testing.TB, s *Store, m *manifest.Manifest) (*Lock, *Partial) {
	t.Helper()
	l, err := s.Lock("baseline")
	if err != nil {
		t.Fatal(err)
	}
	p, err := l.OpenPartial(m.Digest, m.VirtualSize)
	if err != nil {
		t.Fatal(err)
	}
	return l, p
}

// TestPartialResume: a receive cut after a checkpoint resumes there, with
// its missing blocks, and what came after the checkpoint reads as zeros; the
// committed generation is the data, and the partial is gone.
func TestPartialResume(t *testing.T) {
	s := newStore(t)
	data := testImage(1, 2*mib+512)
	m := manifestOf(t, data)
	l, p := openPartial(t, s, m)
	receive(t, p, data, 0, 200)
	p.Missing[7] = true
	p.Hashes[7] = manifest.Hash{}
	if err := p.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	receive(t, p, data, 200, 300) // lost: no checkpoint
	p.Close()
	l.Unlock()

	l, p = openPartial(t, s, m)
	defer l.Unlock()
	if p.Next != 200 || len(p.Missing) != 1 || !p.Missing[7] || p.Hashes[7] != (manifest.Hash{}) || p.Hashes[199] != m.Blocks[199] {
		t.Fatalf("reopened at %d with missing %v, want 200 with block 7 missing", p.Next, p.Missing)
	}
	buf := make([]byte, manifest.BlockSize)
	if err := p.ReadBlocks(250, buf); err != nil || !bytes.Equal(buf, make([]byte, len(buf))) {
		t.Errorf("block 250 after the resume: %v, want zeros", err)
	}
	receive(t, p, data, 200, p.Blocks())
	receive(t, p, data, 7, 8)
	p.Next = p.Blocks()
	p.Fill(7)
	if err := p.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	g, err := p.Commit()
	if err != nil {
		t.Fatal(err)
	}
	if g.Digest != m.Digest || !bytes.Equal(readGen(t, g), data) {
		t.Error("committed generation differs from the data")
	}
	if _, err := os.Stat(filepath.Join(s.nameDir("baseline"), ".partial")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("partial left after commit: %v", err)
	}
}

// TestPartialStartsOver: a damaged progress record restarts at block 0, and
// a partial of another digest is discarded.
func TestPartialStartsOver(t *testing.T) {
	s := newStore(t)
	data := testImage(1, mib)
	m := manifestOf(t, data)
	l, p := openPartial(t, s, m)
	receive(t, p, data, 0, 100)
	if err := p.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	p.Close()
	l.Unlock()
	rec := filepath.Join(s.nameDir("baseline"), ".partial", digestHex(m.Digest)+".progress")
	os.WriteFile(rec, []byte(`{"next": 99999999}`), 0o600)
	l, p = openPartial(t, s, m)
	if p.Next != 0 {
		t.Errorf("damaged record: resumed at %d, want 0", p.Next)
	}
	receive(t, p, data, 0, 100)
	if err := p.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if p, err := l.OpenPartial(m.Digest, m.VirtualSize-512); err != nil || p.Next != 0 {
		t.Errorf("same digest, another size: resumed at %d, %v; want a fresh start", p.Next, err)
	} else {
		p.Close()
	}
	l.Unlock()

	other := manifestOf(t, testImage(2, mib))
	l, p = openPartial(t, s, other)
	defer l.Unlock()
	defer p.Close()
	if got := entries(t, filepath.Join(s.nameDir("baseline"), ".partial")); len(got) != 2 {
		t.Errorf("partial of another digest: directory holds %q, want only the new raw and hashes files", got)
	}
}

// TestCommitWrongDigest: hashes that do not make the digest fail with
// ErrDigest, install nothing and discard the partial.
func TestCommitWrongDigest(t *testing.T) {
	s := newStore(t)
	data := testImage(1, mib)
	m := manifestOf(t, data)
	l, p := openPartial(t, s, m)
	defer l.Unlock()
	other := bytes.Clone(data)
	other[5000] ^= 1
	receive(t, p, other, 0, p.Blocks())
	if _, err := p.Commit(); !errors.Is(err, ErrDigest) {
		t.Fatalf("Commit: got %v, want ErrDigest", err)
	}
	if got := entries(t, s.nameDir("baseline")); len(got) != 1 {
		t.Errorf("after a failed commit the store holds %q, want only .lock", got)
	}
}
