// Package manifest holds the block hashes of a virtual disk: the identity
// that push uses to send only the blocks a host lacks, and that the next
// build compares against.
//
// Identity is the guest-visible disk content, not the container bytes: the
// disk is cut into 4 KiB blocks (BlockSize), each hashed with BLAKE3 and
// truncated to 128 bits (Hash). A short last block is hashed zero-padded to
// 4 KiB. The image digest is BLAKE3-256 over the concatenated block hashes,
// in disk order; its hex form names the image on hosts. Note that the
// digest does not cover the virtual size, which is stored beside it.
//
// # File format (version 1)
//
// All integers are big-endian.
//
//	offset  size  field
//	0       8     magic "NIXVMMAN"
//	8       4     version, 1
//	12      4     flags, 0 (reserved)
//	16      8     payload length L, at most MaxPayload
//	24      L     payload: a sequence of sections
//	24+L    32    BLAKE3-256 of bytes [0, 24+L)
//
// Each section is
//
//	0       4     type; bit 31 set means "required": a reader that does not
//	              know the type must refuse the file, otherwise it skips it
//	4       4     reserved, 0
//	8       8     section length S
//	16      S     section data
//
// Section type 0x80000001 (required, exactly once) is the block list:
//
//	0       8     virtual size in bytes, at most MaxVirtualSize
//	8       4     block size, 4096
//	12      4     reserved, 0
//	16      8     block count N, ceil(virtual size / block size)
//	24      32    digest: BLAKE3-256 over the N block hashes
//	56      ...   runs until N blocks are described, each run being
//	              uvarint Z (zero blocks), uvarint K (literal blocks),
//	              then K hashes of 16 bytes
//
// A run's zero blocks have ZeroHash; literal blocks never equal ZeroHash,
// only the first run may have Z == 0 and only the last K == 0 (a canonical
// encoding, so equal manifests have equal bytes). A disk with no zero
// blocks costs 16 bytes per block; a zero run costs a few bytes. A reader checks the checksum, every length
// and count, and recomputes the digest.
//
// Section type 3 (optional) is the layout map; see Layout. Future sections
// get new type numbers; version 1 readers skip them unless they are
// required.
package manifest

import (
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/zeebo/blake3"
)

// BlockSize is the unit of identity: 4 KiB of the guest-visible disk.
const BlockSize = 4096

// MaxVirtualSize is the largest disk a manifest describes (1 TiB: 256 Mi
// blocks, 4 GiB of hashes in memory).
const MaxVirtualSize = 1 << 40

// Hash identifies one block: BLAKE3 of the 4 KiB block, first 16 bytes.
type Hash [16]byte

// Errors returned by Read, wrapped with details; test with errors.Is.
var (
	ErrNotManifest = errors.New("manifest: not a manifest (bad magic)")
	ErrVersion     = errors.New("manifest: unsupported version")
	ErrChecksum    = errors.New("manifest: checksum mismatch")
	ErrCorrupt     = errors.New("manifest: corrupt")
	ErrTooLarge    = errors.New("manifest: too large")
	ErrTruncated   = errors.New("manifest: truncated")
	ErrInvalid     = errors.New("manifest: invalid")
)

// Manifest is the block-hash list of one virtual disk.
type Manifest struct {
	VirtualSize int64
	Blocks      []Hash   // one per 4 KiB block, zero blocks included
	Digest      [32]byte // BLAKE3-256 over Blocks
	Layout      *Layout  // the root file system's layout map; nil if none
}

var zeroHash = HashBlock(make([]byte, BlockSize))

// ZeroHash returns the hash of an all-zero block.
func ZeroHash() Hash { return zeroHash }

// HashBlock hashes one block; a block shorter than BlockSize is hashed
// zero-padded (only the disk's last block may be short).
func HashBlock(b []byte) Hash {
	if len(b) > BlockSize {
		panic(fmt.Sprintf("manifest: HashBlock of %d bytes, want at most %d", len(b), BlockSize))
	}
	var s [32]byte
	if len(b) < BlockSize {
		var full [BlockSize]byte
		copy(full[:], b)
		s = blake3.Sum256(full[:])
	} else {
		s = blake3.Sum256(b)
	}
	return Hash(s[:16])
}

// ComputeDigest returns BLAKE3-256 over the concatenated block hashes.
func ComputeDigest(blocks []Hash) [32]byte {
	h := blake3.New()
	var buf [64 << 10]byte
	for len(blocks) > 0 {
		n := min(len(blocks), len(buf)/len(Hash{}))
		for i := range n {
			copy(buf[16*i:], blocks[i][:])
		}
		h.Write(buf[:16*n])
		blocks = blocks[n:]
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
}

// BlockCount is the number of blocks of a disk of size bytes.
func BlockCount(size int64) int64 { return (size + BlockSize - 1) / BlockSize }

// Name is the digest in hex: the image's name on hosts.
func (m *Manifest) Name() string { return hex.EncodeToString(m.Digest[:]) }

// Validate checks that the size, the block count and the digest agree.
func (m *Manifest) Validate() error {
	if m.VirtualSize < 0 || m.VirtualSize > MaxVirtualSize {
		return fmt.Errorf("%w: virtual size %d out of range 0 to %d", ErrInvalid, m.VirtualSize, int64(MaxVirtualSize))
	}
	if got, want := int64(len(m.Blocks)), BlockCount(m.VirtualSize); got != want {
		return fmt.Errorf("%w: %d blocks for a %d-byte disk: got %d, want %d", ErrInvalid, got, m.VirtualSize, got, want)
	}
	if got := ComputeDigest(m.Blocks); got != m.Digest {
		return fmt.Errorf("%w: digest: got %x, want %x", ErrInvalid, got, m.Digest)
	}
	if m.Layout != nil {
		return m.Layout.Validate()
	}
	return nil
}

// Diff returns the indices of the blocks that differ between a and b; a
// block present in only one of them counts as different.
func Diff(a, b *Manifest) []int64 {
	var d []int64
	n := max(len(a.Blocks), len(b.Blocks))
	for i := range n {
		if i >= len(a.Blocks) || i >= len(b.Blocks) || a.Blocks[i] != b.Blocks[i] {
			d = append(d, int64(i))
		}
	}
	return d
}
