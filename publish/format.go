package publish

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/zeebo/blake3"
)

// BlockSize is the unit of identity (manifest.BlockSize).
const BlockSize = manifest.BlockSize

// Limits every decoder enforces before it allocates.
const (
	// MaxFrameBlocks bounds the blocks of one frame (4 MiB decoded).
	MaxFrameBlocks = 1024
	// maxFrameOverhead is what zstd may add to incompressible data.
	maxFrameOverhead = 4096
	// MaxIndexSize bounds a pack index object (a pack of 2^24 blocks, 64 GiB).
	MaxIndexSize = 8 + 16 + 8 + 32 + 8 + (1<<24)*(16+2*binary.MaxVarintLen32) + 32
	// MaxRecipeSize bounds a recipe object.
	MaxRecipeSize = 64 << 20
	// MaxPointerSize bounds NAME/latest.
	MaxPointerSize = 64 << 10
	maxPacks       = 1 << 20
)

// maxVirtualSize is manifest.MaxVirtualSize, lowered by the fuzz tests.
var maxVirtualSize int64 = manifest.MaxVirtualSize

// ErrFormat reports a malformed object: a pack index, a recipe or a pointer.
var ErrFormat = errors.New("publish: malformed object")

func formatErr(what, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrFormat, what, fmt.Sprintf(format, args...))
}

// ID is a BLAKE3-256 digest naming an object or an image.
type ID [32]byte

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// ParseID parses a lower-case hex ID.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 64 || hex.EncodeToString(mustHex(s)) != s {
		return id, fmt.Errorf("%w: %q is not 64 lower-case hex digits", ErrFormat, truncate(s, 80))
	}
	copy(id[:], mustHex(s))
	return id, nil
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil
	}
	return b
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func sum(b []byte) ID { return ID(blake3.Sum256(b)) }

// Frame is one zstd frame of a pack: consecutive blocks compressed together.
type Frame struct {
	Offset int64 // in the pack
	Length int64 // compressed bytes
	Blocks []manifest.Hash
}

// PackIndex describes one pack: its frames and the hashes of their blocks.
type PackIndex struct {
	PackSize int64
	PackSum  ID // BLAKE3-256 of the pack's bytes
	Frames   []Frame
	// First[i] is the number of blocks in the frames before frame i: the
	// position of frame i's first hash in the pack's hash sequence.
	First []int64
	nhash int64
	where map[manifest.Hash]int32 // hash to frame, built by find
}

// Hashes is the number of block hashes in the pack.
func (p *PackIndex) Hashes() int64 { return p.nhash }

// Hash returns the pack's k-th block hash and its frame.
func (p *PackIndex) Hash(k int64) (manifest.Hash, int) {
	lo, hi := 0, len(p.Frames)
	for hi-lo > 1 {
		m := (lo + hi) / 2
		if p.First[m] <= k {
			lo = m
		} else {
			hi = m
		}
	}
	return p.Frames[lo].Blocks[k-p.First[lo]], lo
}

const (
	indexMagic  = "NIXVMPIX"
	recipeMagic = "NIXVMRCP"
	fmtVersion  = 1
)

// checkObject checks the frame of a binary object: its size, magic,
// version, flags and trailing BLAKE3-256 checksum; it returns the bytes
// before the checksum.
func checkObject(b []byte, what, magic string, header, max int) ([]byte, error) {
	if len(b) > max {
		return nil, formatErr(what, "%d bytes, at most %d allowed", len(b), max)
	}
	if len(b) < header+32 {
		return nil, formatErr(what, "%d bytes, shorter than a header", len(b))
	}
	if string(b[:8]) != magic {
		return nil, formatErr(what, "bad magic %q", b[:8])
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != fmtVersion {
		return nil, formatErr(what, "version %d, this nixvm-image reads %d (upgrade it)", v, fmtVersion)
	}
	if f := binary.BigEndian.Uint32(b[12:]); f != 0 {
		return nil, formatErr(what, "flags %#x, want 0", f)
	}
	body, want := b[:len(b)-32], b[len(b)-32:]
	if got := sum(body); !bytes.Equal(got[:], want) {
		return nil, formatErr(what, "checksum mismatch")
	}
	return body, nil
}

// Encode returns the index bytes; the pack's name is their BLAKE3-256.
//
//	0   8   magic "NIXVMPIX"
//	8   4   version 1 (big-endian, as every fixed-width integer here)
//	12  4   flags, 0
//	16  8   pack size
//	24  32  BLAKE3-256 of the pack
//	56  8   frame count F
//	64  ... F frames: uvarint compressed length, uvarint block count N,
//	        N block hashes of 16 bytes (frames lie back to back from 0)
//	end 32  BLAKE3-256 of everything before
func (p *PackIndex) Encode() []byte {
	b := make([]byte, 0, 96+len(p.Frames)*8+int(p.nhash)*16)
	b = append(b, indexMagic...)
	b = binary.BigEndian.AppendUint32(b, fmtVersion)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(p.PackSize))
	b = append(b, p.PackSum[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(p.Frames)))
	for _, f := range p.Frames {
		b = binary.AppendUvarint(b, uint64(f.Length))
		b = binary.AppendUvarint(b, uint64(len(f.Blocks)))
		for _, h := range f.Blocks {
			b = append(b, h[:]...)
		}
	}
	s := sum(b)
	return append(b, s[:]...)
}

// addFrame appends a frame at the end of the pack.
func (p *PackIndex) addFrame(length int64, blocks []manifest.Hash) {
	p.Frames = append(p.Frames, Frame{Offset: p.PackSize, Length: length, Blocks: blocks})
	p.First = append(p.First, p.nhash)
	p.PackSize += length
	p.nhash += int64(len(blocks))
}

// DecodeIndex parses and checks a pack index: checksum, sizes, and that
// the frames fill the pack exactly.
func DecodeIndex(b []byte) (*PackIndex, error) {
	const what = "pack index"
	body, err := checkObject(b, what, indexMagic, 64, MaxIndexSize)
	if err != nil {
		return nil, err
	}
	p := &PackIndex{}
	size := binary.BigEndian.Uint64(b[16:])
	copy(p.PackSum[:], b[24:56])
	nf := binary.BigEndian.Uint64(b[56:])
	rest := body[64:]
	if nf > uint64(len(rest)/17) {
		return nil, formatErr(what, "%d frames in %d bytes", nf, len(rest))
	}
	zero := manifest.ZeroHash()
	for i := uint64(0); i < nf; i++ {
		l, n := binary.Uvarint(rest)
		if n <= 0 {
			return nil, formatErr(what, "frame %d: bad length", i)
		}
		rest = rest[n:]
		nb, n := binary.Uvarint(rest)
		if n <= 0 {
			return nil, formatErr(what, "frame %d: bad block count", i)
		}
		rest = rest[n:]
		if nb == 0 || nb > MaxFrameBlocks {
			return nil, formatErr(what, "frame %d: %d blocks, want 1 to %d", i, nb, MaxFrameBlocks)
		}
		if l == 0 || l > nb*BlockSize+maxFrameOverhead {
			return nil, formatErr(what, "frame %d: %d compressed bytes for %d blocks", i, l, nb)
		}
		if uint64(len(rest)) < nb*16 {
			return nil, formatErr(what, "frame %d: %d hashes, only %d bytes left", i, nb, len(rest))
		}
		if uint64(p.PackSize)+l > size {
			return nil, formatErr(what, "frame %d ends at %d, past the pack's %d bytes", i, uint64(p.PackSize)+l, size)
		}
		hs := make([]manifest.Hash, nb)
		for j := range hs {
			copy(hs[j][:], rest[16*j:])
			if hs[j] == zero {
				return nil, formatErr(what, "frame %d holds a zero block", i)
			}
		}
		rest = rest[nb*16:]
		p.addFrame(int64(l), hs)
	}
	if len(rest) != 0 {
		return nil, formatErr(what, "%d bytes after the last frame", len(rest))
	}
	if uint64(p.PackSize) != size {
		return nil, formatErr(what, "frames fill %d bytes of a %d-byte pack", p.PackSize, size)
	}
	return p, nil
}

// Recipe ops.
const (
	opZero  = 0 // n zero blocks
	opBase  = 1 // n blocks of the base image from block start
	opPack  = 2 // n hashes of pack p from hash start
	opSelf  = 3 // n blocks repeating this image's own blocks from start
	opLimit = 4
)

// Recipe is an image's block list expressed as runs over pack indexes and,
// for a delta, over a base image's block list.
//
//	0   8   magic "NIXVMRCP"
//	8   4   version 1
//	12  4   flags, 0
//	16  32  image digest
//	48  32  base image digest, all zero for a full recipe
//	80  8   virtual size
//	88  8   pack count P (at most 2^20)
//	96  ... P pack index names of 32 bytes
//	    ... ops until the image's block count is reached: a byte op, then
//	        0 zero:  uvarint n
//	        1 base:  uvarint start, uvarint n
//	        2 pack:  uvarint p, uvarint start, uvarint n
//	        3 self:  uvarint start, uvarint n (start + n <= current position)
//	end 32  BLAKE3-256 of everything before
type Recipe struct {
	Digest      ID
	Base        ID // zero for a full recipe
	VirtualSize int64
	Packs       []ID
	Ops         []Op
}

// Op is one run of a recipe.
type Op struct {
	Kind  byte
	Pack  int
	Start int64
	N     int64
}

// Encode returns the recipe's bytes.
func (r *Recipe) Encode() []byte {
	b := make([]byte, 0, 128+len(r.Packs)*32+len(r.Ops)*8)
	b = append(b, recipeMagic...)
	b = binary.BigEndian.AppendUint32(b, fmtVersion)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = append(b, r.Digest[:]...)
	b = append(b, r.Base[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(r.VirtualSize))
	b = binary.BigEndian.AppendUint64(b, uint64(len(r.Packs)))
	for _, p := range r.Packs {
		b = append(b, p[:]...)
	}
	for _, o := range r.Ops {
		b = append(b, o.Kind)
		switch o.Kind {
		case opZero:
		case opPack:
			b = binary.AppendUvarint(b, uint64(o.Pack))
			b = binary.AppendUvarint(b, uint64(o.Start))
		default:
			b = binary.AppendUvarint(b, uint64(o.Start))
		}
		b = binary.AppendUvarint(b, uint64(o.N))
	}
	s := sum(b)
	return append(b, s[:]...)
}

// DecodeRecipe parses a recipe and checks its structure: the runs must
// describe exactly the image's block count. Run bounds against the base
// and the packs are checked by Blocks.
func DecodeRecipe(b []byte) (*Recipe, error) {
	body, err := checkObject(b, recipeWhat, recipeMagic, 96, MaxRecipeSize)
	if err != nil {
		return nil, err
	}
	r := &Recipe{}
	copy(r.Digest[:], b[16:48])
	copy(r.Base[:], b[48:80])
	size := binary.BigEndian.Uint64(b[80:])
	if size == 0 || size > uint64(maxVirtualSize) {
		return nil, formatErr(recipeWhat, "virtual size %d out of range 1 to %d", size, maxVirtualSize)
	}
	r.VirtualSize = int64(size)
	np := binary.BigEndian.Uint64(b[88:])
	rest := body[96:]
	if np > maxPacks || np*32 > uint64(len(rest)) {
		return nil, formatErr(recipeWhat, "%d packs in %d bytes", np, len(rest))
	}
	for i := uint64(0); i < np; i++ {
		r.Packs = append(r.Packs, ID(rest[:32]))
		rest = rest[32:]
	}
	d := &runDecoder{rest: rest, total: uint64(manifest.BlockCount(r.VirtualSize)), packs: np}
	for d.at < d.total {
		o, err := d.op()
		if err != nil {
			return nil, err
		}
		r.Ops = append(r.Ops, o)
		d.at += uint64(o.N)
	}
	if len(d.rest) != 0 {
		return nil, formatErr(recipeWhat, "%d bytes after the last run", len(d.rest))
	}
	return r, nil
}

const recipeWhat = "recipe"

// runDecoder reads the runs of a recipe: rest is what is left of it, at
// the block the next run starts at.
type runDecoder struct {
	rest      []byte
	at, total uint64
	packs     uint64
}

func (d *runDecoder) uvarint(field string) (uint64, error) {
	v, n := binary.Uvarint(d.rest)
	if n <= 0 {
		return 0, formatErr(recipeWhat, "run at block %d: bad %s", d.at, field)
	}
	d.rest = d.rest[n:]
	return v, nil
}

// op reads and checks the next run.
func (d *runDecoder) op() (Op, error) {
	if len(d.rest) == 0 {
		return Op{}, formatErr(recipeWhat, "runs end at block %d of %d", d.at, d.total)
	}
	o := Op{Kind: d.rest[0]}
	d.rest = d.rest[1:]
	if o.Kind >= opLimit {
		return Op{}, formatErr(recipeWhat, "run at block %d: unknown kind %d", d.at, o.Kind)
	}
	if o.Kind == opPack {
		p, err := d.uvarint("pack")
		if err != nil {
			return Op{}, err
		}
		if p >= d.packs {
			return Op{}, formatErr(recipeWhat, "run at block %d: pack %d of %d", d.at, p, d.packs)
		}
		o.Pack = int(p)
	}
	if o.Kind != opZero {
		s, err := d.uvarint("start")
		if err != nil {
			return Op{}, err
		}
		if s > manifest.MaxVirtualSize/BlockSize {
			return Op{}, formatErr(recipeWhat, "run at block %d: start %d out of range", d.at, s)
		}
		o.Start = int64(s)
	}
	n, err := d.uvarint("length")
	if err != nil {
		return Op{}, err
	}
	if n == 0 || n > d.total-d.at {
		return Op{}, formatErr(recipeWhat, "run at block %d: %d blocks, %d left", d.at, n, d.total-d.at)
	}
	if o.Kind == opSelf && uint64(o.Start)+n > d.at {
		return Op{}, formatErr(recipeWhat, "run at block %d: repeats blocks %d to %d, not yet known", d.at, o.Start, uint64(o.Start)+n)
	}
	o.N = int64(n)
	return o, nil
}

// Blocks expands the recipe into a block list and checks it against the
// digest. base is the base image's block list (nil for a full recipe);
// packs holds the recipe's packs, in order (entries a recipe does not
// use may be nil).
func (r *Recipe) Blocks(base []manifest.Hash, packs []*PackIndex) (*manifest.Manifest, error) {
	const what = "recipe"
	if len(packs) != len(r.Packs) {
		return nil, fmt.Errorf("publish: recipe names %d packs, got %d", len(r.Packs), len(packs))
	}
	out := make([]manifest.Hash, 0, min(manifest.BlockCount(r.VirtualSize), 1<<16))
	zero := manifest.ZeroHash()
	for _, o := range r.Ops {
		switch o.Kind {
		case opZero:
			for range o.N {
				out = append(out, zero)
			}
		case opBase:
			if r.Base == (ID{}) || o.Start+o.N > int64(len(base)) {
				return nil, formatErr(what, "base run %d+%d outside the base's %d blocks", o.Start, o.N, len(base))
			}
			out = append(out, base[o.Start:o.Start+o.N]...)
		case opSelf:
			out = append(out, out[o.Start:o.Start+o.N]...)
		case opPack:
			p := packs[o.Pack]
			if p == nil {
				return nil, fmt.Errorf("publish: recipe uses pack %s, not loaded", r.Packs[o.Pack])
			}
			if o.Start+o.N > p.Hashes() {
				return nil, formatErr(what, "pack run %d+%d outside pack %s's %d blocks", o.Start, o.N, r.Packs[o.Pack], p.Hashes())
			}
			_, f := p.Hash(o.Start)
			k := o.Start - p.First[f]
			for range o.N {
				for k == int64(len(p.Frames[f].Blocks)) {
					f, k = f+1, 0
				}
				out = append(out, p.Frames[f].Blocks[k])
				k++
			}
		}
	}
	m := &manifest.Manifest{VirtualSize: r.VirtualSize, Blocks: out, Digest: manifest.ComputeDigest(out)}
	if m.Digest != [32]byte(r.Digest) {
		return nil, fmt.Errorf("%w: recipe for %s rebuilds a block list with digest %x: the store is damaged or was tampered with", ErrVerify, r.Digest, m.Digest)
	}
	return m, nil
}

// ErrVerify reports data that does not match its hash or digest.
var ErrVerify = errors.New("publish: verification failed")

// usedPacks lists the packs a recipe's runs use.
func (r *Recipe) usedPacks() []int {
	seen := make([]bool, len(r.Packs))
	var out []int
	for _, o := range r.Ops {
		if o.Kind == opPack && !seen[o.Pack] {
			seen[o.Pack] = true
			out = append(out, o.Pack)
		}
	}
	return out
}
