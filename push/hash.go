package push

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/zeebo/blake3"
)

// BlockSize is the unit of identity: 4 KiB of the guest-visible disk.
const BlockSize = 4096

// Hash identifies one block: BLAKE3 truncated to 128 bits, the same as the
// manifest package's block hashes. A short last block is hashed zero-padded.
type Hash [16]byte

func hashBlock(p []byte) Hash {
	s := blake3.Sum256(p)
	var h Hash
	copy(h[:], s[:16])
	return h
}

var zeroBlock = make([]byte, BlockSize)

// ZeroHash is the hash of an all-zero block.
var ZeroHash = hashBlock(zeroBlock)

// Digest is BLAKE3 over the concatenated block hashes: an image's identity.
func Digest(blocks []Hash) [32]byte {
	h := blake3.New()
	for i := range blocks {
		h.Write(blocks[i][:])
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
}

func runSum(blocks []Hash) [16]byte {
	d := Digest(blocks)
	var s [16]byte
	copy(s[:], d[:])
	return s
}

func prefixOf(h Hash) uint64 { return binary.LittleEndian.Uint64(h[:8]) }

func blockCount(virtualSize int64) int64 { return (virtualSize + BlockSize - 1) / BlockSize }

// HashImage computes the block hashes of the first size bytes of r, reading
// chunks of 4 MiB with all CPUs hashing. progress, if not nil, gets the
// bytes done.
func HashImage(r io.ReaderAt, size int64, progress func(int64)) ([]Hash, error) {
	n := blockCount(size)
	if size <= 0 || size > maxVirtualSize {
		return nil, fmt.Errorf("push: image size %d out of range (1 B to 1 TiB)", size)
	}
	hashes := make([]Hash, n)
	const chunk = 4 << 20
	workers := runtime.GOMAXPROCS(0)
	type job struct {
		off int64
		buf []byte
	}
	jobs := make(chan job, workers)
	free := make(chan []byte, workers+1)
	for i := 0; i < workers+1; i++ {
		free <- make([]byte, chunk)
	}
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				for o := 0; o < len(j.buf); o += BlockSize {
					b := j.buf[o:min(o+BlockSize, len(j.buf))]
					if len(b) < BlockSize {
						b = append(append([]byte(nil), b...), zeroBlock[len(b):]...)
					}
					hashes[(j.off+int64(o))/BlockSize] = hashBlock(b)
				}
				free <- j.buf[:cap(j.buf)]
			}
		}()
	}
	var err error
	for off := int64(0); off < size; off += chunk {
		buf := <-free
		buf = buf[:min(int64(chunk), size-off)]
		if n, e := r.ReadAt(buf, off); n < len(buf) {
			err = fmt.Errorf("push: reading image at %d: %w", off, noEOF(e))
			free <- buf
			break
		}
		jobs <- job{off, buf}
		if progress != nil {
			progress(int64(len(buf)))
		}
	}
	close(jobs)
	wg.Wait()
	if err != nil {
		return nil, err
	}
	return hashes, nil
}

// Index files: the host's record of a generation's block hashes, written as
// the generation is written so no old image is ever re-read to be indexed.
//
//	"nixvmidx" | virtual size (8 bytes LE) | hashes (16 bytes each) | digest (32)
const indexMagic = "nixvmidx"

// ErrIndex reports an index file that is damaged.
var ErrIndex = errors.New("push: bad index")

func writeIndex(w io.Writer, virtualSize int64, blocks []Hash) error {
	bw := bufio.NewWriter(w)
	bw.WriteString(indexMagic)
	binary.Write(bw, binary.LittleEndian, uint64(virtualSize))
	for i := range blocks {
		bw.Write(blocks[i][:])
	}
	d := Digest(blocks)
	bw.Write(d[:])
	return bw.Flush()
}

func readIndex(r io.Reader) (int64, []Hash, [32]byte, error) {
	var d [32]byte
	br := bufio.NewReader(r)
	var m [8]byte
	if _, err := io.ReadFull(br, m[:]); err != nil || string(m[:]) != indexMagic {
		return 0, nil, d, fmt.Errorf("%w: no index magic", ErrIndex)
	}
	var size uint64
	if err := binary.Read(br, binary.LittleEndian, &size); err != nil {
		return 0, nil, d, fmt.Errorf("%w: %v", ErrIndex, err)
	}
	if size == 0 || size > maxVirtualSize {
		return 0, nil, d, fmt.Errorf("%w: virtual size %d out of range", ErrIndex, size)
	}
	blocks := make([]Hash, blockCount(int64(size)))
	for i := range blocks {
		if _, err := io.ReadFull(br, blocks[i][:]); err != nil {
			return 0, nil, d, fmt.Errorf("%w: %v", ErrIndex, err)
		}
	}
	if _, err := io.ReadFull(br, d[:]); err != nil {
		return 0, nil, d, fmt.Errorf("%w: %v", ErrIndex, err)
	}
	if got := Digest(blocks); got != d {
		return 0, nil, d, fmt.Errorf("%w: digest mismatch: got %x, want %x", ErrIndex, got, d)
	}
	return int64(size), blocks, d, nil
}
