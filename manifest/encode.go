package manifest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/zeebo/blake3"
)

const (
	magic          = "NIXVMMAN"
	version        = 1
	fileHeaderLen  = 24
	checksumLen    = 32
	sectionHdrLen  = 16
	blocksHdrLen   = 56
	sectionBlocks  = 0x80000001
	sectionRequire = 0x80000000

	// MaxPayload bounds the payload a reader accepts: the block list of a
	// MaxVirtualSize disk with no zero blocks, plus 1 GiB for other sections.
	MaxPayload = sectionHdrLen + blocksHdrLen + (MaxVirtualSize/BlockSize)*16 + 2*binary.MaxVarintLen64 + 1<<30
)

// readMaxSize is MaxVirtualSize, lowered by the fuzz test.
var readMaxSize int64 = MaxVirtualSize

// WriteTo writes m in the version 1 format (see the package doc). It
// validates m first.
func (m *Manifest) WriteTo(w io.Writer) (int64, error) {
	if err := m.Validate(); err != nil {
		return 0, err
	}
	sec := m.encodeBlocks()
	var layout []byte
	plen := sectionHdrLen + len(sec)
	if m.Layout != nil {
		layout = m.Layout.encode()
		plen += sectionHdrLen + len(layout)
	}
	out := make([]byte, 0, fileHeaderLen+plen+checksumLen)
	out = append(out, magic...)
	out = binary.BigEndian.AppendUint32(out, version)
	out = binary.BigEndian.AppendUint32(out, 0)
	out = binary.BigEndian.AppendUint64(out, uint64(plen))
	out = appendSection(out, sectionBlocks, sec)
	if layout != nil {
		out = appendSection(out, sectionLayout, layout)
	}
	sum := blake3.Sum256(out)
	out = append(out, sum[:]...)
	n, err := w.Write(out)
	if err == nil && n < len(out) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return int64(n), fmt.Errorf("manifest: write: %w", err)
	}
	return int64(n), nil
}

// appendSection appends a section: its type, a reserved word, its length
// and its bytes.
func appendSection(out []byte, typ uint32, sec []byte) []byte {
	out = binary.BigEndian.AppendUint32(out, typ)
	out = binary.BigEndian.AppendUint32(out, 0)
	out = binary.BigEndian.AppendUint64(out, uint64(len(sec)))
	return append(out, sec...)
}

// encodeBlocks is the block-list section: its header, then alternating
// runs of zero blocks (a count) and literal hashes (a count and hashes).
func (m *Manifest) encodeBlocks() []byte {
	var sec bytes.Buffer
	var hdr [blocksHdrLen]byte
	binary.BigEndian.PutUint64(hdr[0:], uint64(m.VirtualSize))
	binary.BigEndian.PutUint32(hdr[8:], BlockSize)
	binary.BigEndian.PutUint64(hdr[16:], uint64(len(m.Blocks)))
	copy(hdr[24:], m.Digest[:])
	sec.Write(hdr[:])
	for i := 0; i < len(m.Blocks); {
		z := i
		for z < len(m.Blocks) && m.Blocks[z] == zeroHash {
			z++
		}
		k := z
		for k < len(m.Blocks) && m.Blocks[k] != zeroHash {
			k++
		}
		sec.Write(binary.AppendUvarint(nil, uint64(z-i)))
		sec.Write(binary.AppendUvarint(nil, uint64(k-z)))
		for j := z; j < k; j++ {
			sec.Write(m.Blocks[j][:])
		}
		i = k
	}
	return sec.Bytes()
}

// Read reads one manifest in the version 1 format and validates it: magic,
// version, sizes within bounds, the checksum, the structure of every
// section, and the digest. It reads exactly the manifest's bytes from r.
func Read(r io.Reader) (*Manifest, error) {
	var hdr [fileHeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, readErr("header", err)
	}
	if string(hdr[:8]) != magic {
		return nil, fmt.Errorf("%w: got %q, want %q", ErrNotManifest, hdr[:8], magic)
	}
	if v := binary.BigEndian.Uint32(hdr[8:]); v != version {
		return nil, fmt.Errorf("%w: got version %d, want %d (a newer nixvm-image wrote it?)", ErrVersion, v, version)
	}
	if f := binary.BigEndian.Uint32(hdr[12:]); f != 0 {
		return nil, fmt.Errorf("%w: header flags: got %#x, want 0", ErrCorrupt, f)
	}
	plen := binary.BigEndian.Uint64(hdr[16:])
	if plen > MaxPayload {
		return nil, fmt.Errorf("%w: payload of %d bytes, at most %d allowed", ErrTooLarge, plen, uint64(MaxPayload))
	}
	// Read payload and checksum without trusting plen for the allocation:
	// the buffer grows only as data arrives.
	var body bytes.Buffer
	body.Write(hdr[:])
	want := int64(plen) + checksumLen
	if n, err := io.CopyN(&body, r, want); err != nil {
		return nil, readErr(fmt.Sprintf("got %d of %d payload and checksum bytes", n, want), err)
	}
	all := body.Bytes()
	data, sum := all[:len(all)-checksumLen], all[len(all)-checksumLen:]
	if got := blake3.Sum256(data); !bytes.Equal(got[:], sum) {
		return nil, fmt.Errorf("%w: got %x, want %x", ErrChecksum, got, sum)
	}
	return decodeSections(data[fileHeaderLen:])
}

// readErr wraps a read error: a short input is ErrTruncated, anything else
// is the reader's own error.
func readErr(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %s: %w", ErrTruncated, what, err)
	}
	return fmt.Errorf("manifest: read: %s: %w", what, err)
}

func decodeSections(p []byte) (*Manifest, error) {
	var m *Manifest
	var layout *Layout
	for len(p) > 0 {
		if len(p) < sectionHdrLen {
			return nil, fmt.Errorf("%w: %d bytes left, want a %d-byte section header", ErrCorrupt, len(p), sectionHdrLen)
		}
		typ := binary.BigEndian.Uint32(p[0:])
		if res := binary.BigEndian.Uint32(p[4:]); res != 0 {
			return nil, fmt.Errorf("%w: section %#x reserved field: got %#x, want 0", ErrCorrupt, typ, res)
		}
		slen := binary.BigEndian.Uint64(p[8:])
		p = p[sectionHdrLen:]
		if slen > uint64(len(p)) {
			return nil, fmt.Errorf("%w: section %#x of %d bytes, only %d left", ErrCorrupt, typ, slen, len(p))
		}
		s := p[:slen]
		p = p[slen:]
		switch {
		case typ == sectionBlocks:
			if m != nil {
				return nil, fmt.Errorf("%w: two block-list sections", ErrCorrupt)
			}
			var err error
			if m, err = decodeBlocks(s); err != nil {
				return nil, err
			}
		case typ == sectionLayout:
			if layout != nil {
				return nil, fmt.Errorf("%w: two layout sections", ErrCorrupt)
			}
			var err error
			if layout, err = decodeLayout(s); err != nil {
				return nil, err
			}
		case typ&sectionRequire != 0:
			return nil, fmt.Errorf("%w: required section type %#x unknown to this version", ErrVersion, typ)
		}
	}
	if m == nil {
		return nil, fmt.Errorf("%w: no block-list section", ErrCorrupt)
	}
	m.Layout = layout
	return m, nil
}

func decodeBlocks(s []byte) (*Manifest, error) {
	m, count, err := decodeBlocksHeader(s)
	if err != nil {
		return nil, err
	}
	blocks, err := decodeRuns(s[blocksHdrLen:], count)
	if err != nil {
		return nil, err
	}
	m.Blocks = blocks
	if got := ComputeDigest(blocks); got != m.Digest {
		return nil, fmt.Errorf("%w: digest: got %x, want %x", ErrCorrupt, got, m.Digest)
	}
	return m, nil
}

// decodeBlocksHeader checks the block-list header and returns the manifest
// it describes, without blocks, and their count.
func decodeBlocksHeader(s []byte) (*Manifest, uint64, error) {
	if len(s) < blocksHdrLen {
		return nil, 0, fmt.Errorf("%w: block-list header of %d bytes, want %d", ErrCorrupt, len(s), blocksHdrLen)
	}
	size := binary.BigEndian.Uint64(s[0:])
	if size > uint64(readMaxSize) {
		return nil, 0, fmt.Errorf("%w: virtual size %d, at most %d allowed", ErrTooLarge, size, readMaxSize)
	}
	if bs := binary.BigEndian.Uint32(s[8:]); bs != BlockSize {
		return nil, 0, fmt.Errorf("%w: block size: got %d, want %d", ErrCorrupt, bs, BlockSize)
	}
	if res := binary.BigEndian.Uint32(s[12:]); res != 0 {
		return nil, 0, fmt.Errorf("%w: block-list reserved field: got %#x, want 0", ErrCorrupt, res)
	}
	count := binary.BigEndian.Uint64(s[16:])
	if want := uint64(BlockCount(int64(size))); count != want {
		return nil, 0, fmt.Errorf("%w: block count for %d bytes: got %d, want %d", ErrCorrupt, size, count, want)
	}
	m := &Manifest{VirtualSize: int64(size)}
	copy(m.Digest[:], s[24:56])
	return m, count, nil
}

// decodeRuns decodes count block hashes from their runs in s, which they
// must fill exactly and canonically.
func decodeRuns(s []byte, count uint64) ([]Hash, error) {
	// Grow the blocks as runs are decoded, so memory follows the input.
	blocks := make([]Hash, 0, min(count, 1<<16))
	for first := true; uint64(len(blocks)) < count; first = false {
		z, n := binary.Uvarint(s)
		if n <= 0 {
			return nil, fmt.Errorf("%w: bad zero-run length at block %d", ErrCorrupt, len(blocks))
		}
		s = s[n:]
		k, n := binary.Uvarint(s)
		if n <= 0 {
			return nil, fmt.Errorf("%w: bad literal-run length at block %d", ErrCorrupt, len(blocks))
		}
		s = s[n:]
		left := count - uint64(len(blocks))
		if z > left || k > left-z {
			return nil, fmt.Errorf("%w: run of %d zero and %d literal blocks at block %d overruns the %d blocks", ErrCorrupt, z, k, len(blocks), count)
		}
		if z == 0 && !first || z == 0 && k == 0 || k == 0 && uint64(len(blocks))+z < count {
			return nil, fmt.Errorf("%w: non-canonical empty run at block %d", ErrCorrupt, len(blocks))
		}
		if k*16 > uint64(len(s)) {
			return nil, fmt.Errorf("%w: %d literal hashes at block %d, only %d bytes left", ErrCorrupt, k, len(blocks), len(s))
		}
		for range z {
			blocks = append(blocks, zeroHash)
		}
		for range k {
			h := Hash(s[:16])
			if h == zeroHash {
				return nil, fmt.Errorf("%w: literal zero-block hash at block %d", ErrCorrupt, len(blocks))
			}
			blocks = append(blocks, h)
			s = s[16:]
		}
	}
	if len(s) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the last block run", ErrCorrupt, len(s))
	}
	return blocks, nil
}
