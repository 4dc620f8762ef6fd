package manifest

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// Errors returned by Hasher.
var (
	ErrNotAscending = errors.New("manifest: write offset not ascending")
	ErrBeyondEnd    = errors.New("manifest: write beyond the virtual disk size")
	ErrFinished     = errors.New("manifest: write after Finish")
)

// batchBlocksPerWorker is how many blocks each worker hashes per batch
// (1 MiB of data).
const batchBlocksPerWorker = 256

// Hasher computes a Manifest from virtual-disk data written at ascending
// offsets, like qcow.Writer: gaps are zero blocks, partial blocks are
// completed by the next write or by Finish. Data is hashed in batches on
// several goroutines; the result does not depend on their number. A Hasher
// is not safe for concurrent use; errors are sticky.
type Hasher struct {
	size    int64
	workers int
	blocks  []Hash
	pos     int64  // end of the last write
	buf     []byte // batch buffer
	bufOff  int64  // virtual offset of buf[0] (block aligned), -1 if empty
	err     error
	done    bool
}

// NewHasher returns a Hasher for a disk of virtualSize bytes; workers <= 0
// means runtime.GOMAXPROCS(0). A size out of range (negative or above
// MaxVirtualSize) is reported by the first WriteAt or by Finish.
func NewHasher(virtualSize int64, workers int) *Hasher {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	h := &Hasher{size: virtualSize, workers: workers, bufOff: -1}
	if virtualSize < 0 || virtualSize > MaxVirtualSize {
		h.err = fmt.Errorf("%w: virtual size %d out of range 0 to %d", ErrTooLarge, virtualSize, int64(MaxVirtualSize))
		return h
	}
	h.blocks = make([]Hash, BlockCount(virtualSize))
	for i := range h.blocks {
		h.blocks[i] = zeroHash
	}
	h.buf = make([]byte, workers*batchBlocksPerWorker*BlockSize)
	return h
}

// WriteAt hashes data at virtual offset off, which must be at or after the
// end of the previous write.
func (h *Hasher) WriteAt(p []byte, off int64) (int, error) {
	if h.done {
		return 0, ErrFinished
	}
	if h.err != nil {
		return 0, h.err
	}
	if off < h.pos {
		return 0, fmt.Errorf("%w: got offset %d, want at least %d (the end of the previous write)", ErrNotAscending, off, h.pos)
	}
	if off > h.size || int64(len(p)) > h.size-off {
		return 0, fmt.Errorf("%w: got %d bytes at offset %d, virtual size is %d", ErrBeyondEnd, len(p), off, h.size)
	}
	n := len(p)
	for len(p) > 0 {
		if h.bufOff >= 0 && off >= h.bufOff+int64(len(h.buf)) {
			h.flush()
		}
		if h.bufOff < 0 {
			h.bufOff = off &^ (BlockSize - 1)
		}
		c := copy(h.buf[off-h.bufOff:], p)
		p = p[c:]
		off += int64(c)
		h.pos = off
	}
	h.pos = off
	return n, nil
}

// Finish hashes what is pending and returns the manifest. Later writes fail
// with ErrFinished; Finish may be called again and returns the same result.
func (h *Hasher) Finish() (*Manifest, error) {
	if h.err != nil {
		return nil, h.err
	}
	h.done = true
	h.flush()
	m := &Manifest{VirtualSize: h.size, Blocks: h.blocks, Digest: ComputeDigest(h.blocks)}
	return m, nil
}

// flush hashes the batch buffer up to the last written byte.
func (h *Hasher) flush() {
	if h.bufOff < 0 {
		return
	}
	filled := min(h.pos-h.bufOff, int64(len(h.buf)))
	nblocks := int((filled + BlockSize - 1) / BlockSize)
	first := h.bufOff / BlockSize
	per := (nblocks + h.workers - 1) / h.workers
	var wg sync.WaitGroup
	for lo := 0; lo < nblocks; lo += per {
		hi := min(lo+per, nblocks)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := lo; i < hi; i++ {
				b := h.buf[i*BlockSize : (i+1)*BlockSize]
				if !zeros.All(b) {
					// The disk's short last block is zero beyond its end
					// in buf, so hashing the full block pads it.
					h.blocks[first+int64(i)] = HashBlock(b)
				}
			}
		}()
	}
	wg.Wait()
	clear(h.buf[:nblocks*BlockSize])
	h.bufOff = -1
}
