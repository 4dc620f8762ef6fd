package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// installChunk is how many blocks install reads, checks and writes at once.
const installChunk = 256

// Put installs the virtual disk r, whose block hashes m holds, as a
// generation of name and makes it current: Lock, Lock.Put, Lock.Activate,
// Unlock. It fails with ErrBusy while another process holds name's lock.
func (s *Store) Put(name string, r io.ReaderAt, m *manifest.Manifest) (Generation, error) {
	l, err := s.Lock(name)
	if err != nil {
		return Generation{}, err
	}
	g, err := l.Put(r, m)
	if err == nil {
		err = l.Activate(g.Digest, "")
		g.Current = err == nil
	}
	return g, errors.Join(err, l.Unlock())
}

// Put installs the virtual disk r (m.VirtualSize bytes, read with ReadAt;
// reads past its end may fail with io.EOF) as generation m.Digest of the
// locked name, without making it current. Every block is checked against m
// on its way into the file; a mismatch fails with ErrDigest and installs
// nothing. A generation the store holds already is left as it is; the same
// digest with another size fails with ErrConflict.
func (l *Lock) Put(r io.ReaderAt, m *manifest.Manifest) (Generation, error) {
	if err := m.Validate(); err != nil {
		return Generation{}, fmt.Errorf("%w: %w", ErrDigest, err)
	}
	if err := checkSize(m.VirtualSize); err != nil {
		return Generation{}, err
	}
	if g, ok, err := l.held(m.Digest, m.VirtualSize); ok || err != nil {
		return g, err
	}
	if err := l.install(r, m); err != nil {
		return Generation{}, fmt.Errorf("store: storing generation %x of %q: %w", m.Digest[:8], l.name, err)
	}
	g, ok := l.s.generation(l.name, m.Digest)
	if !ok {
		return g, fmt.Errorf("BUG: store: generation %x of %q missing after install", m.Digest[:8], l.name)
	}
	return g, nil
}

// held reports whether the locked name holds generation digest of size
// bytes. The same digest with another size (a digest does not cover the
// size) fails with ErrConflict, and so does a file of the generation's name
// that is not a complete generation: installing must never replace either.
func (l *Lock) held(digest [32]byte, size int64) (Generation, bool, error) {
	g, ok := l.s.generation(l.name, digest)
	if ok && g.VirtualSize != size {
		return g, false, fmt.Errorf("%w: %s has %d bytes, this image %d; the store keeps generations immutable, so it cannot take both", ErrConflict, g.Path, g.VirtualSize, size)
	}
	if ok {
		return g, true, nil
	}
	p := filepath.Join(l.dir, genFile(digest))
	if _, err := os.Lstat(p); err == nil {
		return g, false, fmt.Errorf("%w: %s exists but has no index: not a generation this store installed; move it away", ErrConflict, p)
	} else if !errors.Is(err, os.ErrNotExist) {
		return g, false, err
	}
	return g, false, nil
}

// checkSize checks that a generation can have size bytes: the qcow2 file
// holds whole 512-byte sectors.
func checkSize(size int64) error {
	if size <= 0 || size > manifest.MaxVirtualSize || size%512 != 0 {
		return fmt.Errorf("%w: virtual size %d: want a positive multiple of 512 up to %d", ErrSize, size, int64(manifest.MaxVirtualSize))
	}
	return nil
}

// install writes the image to a temporary file beside its final name, then
// renames the index into place, then the image, and syncs the directory.
func (l *Lock) install(r io.ReaderAt, m *manifest.Manifest) (err error) {
	base := filepath.Join(l.dir, genFile(m.Digest))
	f, err := os.CreateTemp(l.dir, ".tmp-*.qcow2")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = writeQcow2(f, r, m); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Chmod(0o444); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	err = fsutil.WriteAtomicWith(base+manifestExt, 0o444, func(w io.Writer) error {
		_, err := m.WriteTo(w) // one write: no buffer needed
		return err
	})
	if err != nil {
		return err
	}
	if err = os.Rename(f.Name(), base); err != nil {
		return err
	}
	return fsutil.SyncDir(l.dir)
}

// writeQcow2 writes r as an uncompressed qcow2 into f, checking every block
// it reads against m and skipping the chunks that m says are all zero.
func writeQcow2(f *os.File, r io.ReaderAt, m *manifest.Manifest) error {
	qw, err := qcow.NewWriter(f, m.VirtualSize, qcow.Options{Compression: qcow.None})
	if err != nil {
		return err
	}
	zero := manifest.ZeroHash()
	n := int64(len(m.Blocks))
	buf := make([]byte, installChunk*manifest.BlockSize)
	for b := int64(0); b < n; b += installChunk {
		want := m.Blocks[b:min(b+installChunk, n)]
		if allEqual(want, zero) {
			continue
		}
		chunk := buf[:len(want)*manifest.BlockSize]
		if err := readBlocksAt(r, m.VirtualSize, b, chunk); err != nil {
			return err
		}
		if err := checkBlocks(chunk, want, b); err != nil {
			return err
		}
		end := min(int64(len(chunk)), m.VirtualSize-b*manifest.BlockSize)
		if _, err := qw.WriteAt(chunk[:end], b*manifest.BlockSize); err != nil {
			return err
		}
	}
	return qw.Close()
}

func allEqual(hs []manifest.Hash, h manifest.Hash) bool {
	for _, x := range hs {
		if x != h {
			return false
		}
	}
	return true
}

// checkBlocks checks each block of chunk (block first onwards) against want.
func checkBlocks(chunk []byte, want []manifest.Hash, first int64) error {
	for i, w := range want {
		if got := manifest.HashBlock(chunk[i*manifest.BlockSize : (i+1)*manifest.BlockSize]); got != w {
			return fmt.Errorf("%w: block %d of the image changed before it was stored: got %x, want %x", ErrDigest, first+int64(i), got, w)
		}
	}
	return nil
}

// readBlocksAt reads whole blocks from start into buf from a disk of size
// bytes; what lies past the end reads as zeros.
func readBlocksAt(r io.ReaderAt, size, start int64, buf []byte) error {
	off := start * manifest.BlockSize
	n := len(buf)
	if end := off + int64(n); end > size {
		n = int(max(0, size-off))
		clear(buf[n:])
	}
	k, err := r.ReadAt(buf[:n], off)
	if k == n {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}
