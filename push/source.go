package push

import (
	"bufio"
	"errors"
	"fmt"
	"github.com/nixvm-image/nixvm-image/qcow"
	"io"
	"os"
	"runtime"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/nixvm-image/nixvm-image/manifest"
)

// Source is an image to push: its guest-visible content and block hashes.
type Source struct {
	R           io.ReaderAt
	VirtualSize int64
	Blocks      []manifest.Hash
	Digest      [32]byte
	// FromManifest says the hashes came from IMAGE.manifest, not from
	// reading the image.
	FromManifest bool
	close        func() error
}

// Close releases the image file.
func (s *Source) Close() error {
	if s.close != nil {
		return s.close()
	}
	return nil
}

// OpenSource opens a qcow2 (or raw) image. Its block hashes come from the
// manifest the builder wrote beside it (path + ".manifest") when that
// exists and has the image's virtual size, else from hashing the image.
// progress, if not nil, receives bytes hashed.
func OpenSource(path string, progress func(int64)) (*Source, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	qcow.RegisterReaderCodecs()
	img, err := qcow2reader.Open(f)
	if err == nil {
		err = img.Readable()
		if err != nil {
			img.Close()
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("push: %s: %w", path, err)
	}
	src, err := sourceOf(path, img, img.Size(), progress)
	if err != nil {
		img.Close()
		f.Close()
		return nil, err
	}
	src.close = func() error { return errors.Join(img.Close(), f.Close()) }
	return src, nil
}

// sourceOf describes the image at path, read through r: from the builder's
// manifest beside it when that fits, else by hashing r.
func sourceOf(path string, r io.ReaderAt, size int64, progress func(int64)) (*Source, error) {
	m, err := readManifestFile(path + ".manifest")
	switch {
	case err == nil && m.VirtualSize == size:
		// The builder's manifest: no need to hash the image again.
		if progress != nil {
			progress(m.VirtualSize)
		}
		return &Source{R: r, VirtualSize: m.VirtualSize, Blocks: m.Blocks, Digest: m.Digest, FromManifest: true}, nil
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("push: %s.manifest: %w (delete it to hash the image instead)", path, err)
	}
	src, err := NewSource(r, size, progress)
	if err != nil {
		return nil, fmt.Errorf("push: %s: %w", path, err)
	}
	return src, nil
}

// NewSource hashes the virtual disk r of the given size. r must allow
// concurrent ReadAt calls, as files and go-qcow2reader images do.
func NewSource(r io.ReaderAt, size int64, progress func(int64)) (*Source, error) {
	m, err := hashImage(r, size, progress)
	if err != nil {
		return nil, err
	}
	return &Source{R: r, VirtualSize: size, Blocks: m.Blocks, Digest: m.Digest}, nil
}

// hashChunk is how much of the image one read covers while hashing.
const hashChunk = 4 << 20

// hashImage computes the manifest of the first size bytes of r: one
// goroutine per CPU reads (and so decompresses) 4 MiB chunks ahead, and
// a manifest.Hasher hashes them in order. progress, if not nil, gets the
// bytes done.
func hashImage(r io.ReaderAt, size int64, progress func(int64)) (*manifest.Manifest, error) {
	if size <= 0 || size > manifest.MaxVirtualSize {
		return nil, fmt.Errorf("push: image size %d out of range (1 B to 1 TiB)", size)
	}
	h := manifest.NewHasher(size, 0)
	done := make(chan struct{})
	defer close(done)
	for c := range readAhead(r, size, done) {
		if c.err != nil {
			return nil, fmt.Errorf("push: reading image at %d: %w", c.off, noEOF(c.err))
		}
		if _, err := h.WriteAt(c.b, c.off); err != nil {
			return nil, err
		}
		if progress != nil {
			progress(int64(len(c.b)))
		}
		c.release()
	}
	return h.Finish()
}

// chunkRead is one chunk of the image read by readAhead.
type chunkRead struct {
	off     int64
	b       []byte
	err     error
	release func() // gives the buffer back for the next read
}

// readAhead reads r in hashChunk pieces, runtime.GOMAXPROCS(0) at a time,
// and delivers them in order until size or until done is closed.
func readAhead(r io.ReaderAt, size int64, done <-chan struct{}) <-chan chunkRead {
	workers := runtime.GOMAXPROCS(0)
	bufs := make(chan []byte, workers)
	for range workers {
		bufs <- make([]byte, hashChunk)
	}
	inOrder := make(chan chan chunkRead, workers)
	go func() {
		defer close(inOrder)
		for off := int64(0); off < size; off += hashChunk {
			var buf []byte
			select {
			case buf = <-bufs:
			case <-done:
				return
			}
			c := make(chan chunkRead, 1)
			inOrder <- c // never blocks: at most workers buffers are out
			go func() {
				b := buf[:min(hashChunk, size-off)]
				n, err := r.ReadAt(b, off)
				if n == len(b) {
					err = nil
				} else if err == nil {
					err = io.ErrUnexpectedEOF
				}
				c <- chunkRead{off, b, err, func() { bufs <- buf }}
			}()
		}
	}()
	out := make(chan chunkRead)
	go func() {
		defer close(out)
		for c := range inOrder {
			select {
			case out <- <-c:
			case <-done:
				return
			}
		}
	}()
	return out
}

func readManifestFile(path string) (*manifest.Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return manifest.Read(bufio.NewReaderSize(f, 1<<20))
}
