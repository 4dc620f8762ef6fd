package push

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// BlockSize is the unit of identity: 4 KiB of the guest-visible disk.
const BlockSize = manifest.BlockSize

// Hash identifies one block: BLAKE3 truncated to 128 bits (manifest.Hash).
// A short last block is hashed zero-padded.
type Hash = manifest.Hash

func hashBlock(p []byte) Hash { return manifest.HashBlock(p) }

var zeroBlock = make([]byte, BlockSize)

// ZeroHash is the hash of an all-zero block.
var ZeroHash = manifest.ZeroHash()

// Digest is BLAKE3 over the concatenated block hashes: an image's identity.
func Digest(blocks []Hash) [32]byte { return manifest.ComputeDigest(blocks) }

func runSum(blocks []Hash) [16]byte {
	d := Digest(blocks)
	var s [16]byte
	copy(s[:], d[:])
	return s
}

// prefixOf is the first width (1 to 4) bytes of h, little-endian.
func prefixOf(h Hash, width int) uint32 {
	return binary.LittleEndian.Uint32(h[:4]) & uint32(uint64(1)<<(8*width)-1)
}

func blockCount(virtualSize int64) int64 { return (virtualSize + BlockSize - 1) / BlockSize }

// HashImage computes the block hashes of the first size bytes of r, with
// one goroutine per CPU each reading and hashing 4 MiB chunks (r must allow
// concurrent ReadAt, as files and go-qcow2reader images do). progress, if
// not nil, gets the bytes done, from several goroutines.
func HashImage(r io.ReaderAt, size int64, progress func(int64)) ([]Hash, error) {
	if size <= 0 || size > maxVirtualSize {
		return nil, fmt.Errorf("push: image size %d out of range (1 B to 1 TiB)", size)
	}
	hashes := make([]Hash, blockCount(size))
	const chunk = 4 << 20
	offs := make(chan int64)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for off := range offs {
				b := buf[:min(int64(chunk), size-off)]
				if n, err := r.ReadAt(b, off); n < len(b) {
					select {
					case errs <- fmt.Errorf("push: reading image at %d: %w", off, noEOF(err)):
					default:
					}
					continue
				}
				for o := 0; o < len(b); o += BlockSize {
					hashes[(off+int64(o))/BlockSize] = hashBlock(b[o:min(o+BlockSize, len(b))])
				}
				if progress != nil {
					progress(int64(len(b)))
				}
			}
		}()
	}
	var err error
feed:
	for off := int64(0); off < size; off += chunk {
		select {
		case err = <-errs:
			break feed
		case offs <- off:
		}
	}
	close(offs)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	if err != nil {
		return nil, err
	}
	return hashes, nil
}

// Index files: the host's record of a generation's block hashes, a
// manifest written as the generation is written, so no old image is ever
// re-read to be indexed.

// ErrIndex reports an index file that is damaged.
var ErrIndex = errors.New("push: bad index")

func writeIndex(w io.Writer, virtualSize int64, blocks []Hash) error {
	m := &manifest.Manifest{VirtualSize: virtualSize, Blocks: blocks, Digest: Digest(blocks)}
	_, err := m.WriteTo(w)
	return err
}

func readIndex(r io.Reader) (int64, []Hash, [32]byte, error) {
	m, err := manifest.Read(r)
	if err != nil {
		return 0, nil, [32]byte{}, fmt.Errorf("%w: %w", ErrIndex, err)
	}
	if m.VirtualSize <= 0 || m.VirtualSize > maxVirtualSize {
		return 0, nil, m.Digest, fmt.Errorf("%w: virtual size %d out of range", ErrIndex, m.VirtualSize)
	}
	return m.VirtualSize, m.Blocks, m.Digest, nil
}
