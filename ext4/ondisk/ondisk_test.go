package ondisk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
)

func TestCRC32C(t *testing.T) {
	// The check value of CRC-32C is 0xE3069283 for "123456789", with the
	// initial and final inversion that CRC32C leaves to its caller.
	if got := ^CRC32C(^uint32(0), []byte("123456789")); got != 0xE3069283 {
		t.Errorf("crc32c check value: got %#08x, want 0xe3069283", got)
	}
	a, b := []byte("metadata"), []byte("_csum")
	if got, want := CRC32C(CRC32C(7, a), b), CRC32C(7, append(a, b...)); got != want {
		t.Errorf("chained: got %#08x, want %#08x", got, want)
	}
}

func randomSuper(r *rand.Rand) []byte {
	b := make([]byte, SuperblockSize)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	binary.LittleEndian.PutUint16(b[0x38:], Magic)
	binary.LittleEndian.PutUint32(b[0x18:], r.Uint32N(maxLogBlockSize+1))
	return b
}

// TestSuperblockRoundTrip: Marshal of a parsed superblock gives back its
// bytes, but for s_checksum with metadata_csum, and parses to the same
// fields; every named field reaches the bytes.
func TestSuperblockRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		b := randomSuper(r)
		s, err := ParseSuperblock(b)
		if err != nil {
			t.Fatal(err)
		}
		out := s.Marshal()
		if s.MetadataCsum() {
			if got, want := binary.LittleEndian.Uint32(out[superCsumOffset:]), CRC32C(^uint32(0), b[:superCsumOffset]); got != want {
				t.Fatalf("case %d: checksum got %#x, want %#x", i, got, want)
			}
			copy(out[superCsumOffset:], b[superCsumOffset:])
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("case %d: Marshal(Parse(b)) differs from b", i)
		}
		s2, err := ParseSuperblock(s.Marshal())
		if err != nil {
			t.Fatal(err)
		}
		s2.raw, s2.Checksum = s.raw, s.Checksum
		if *s2 != *s {
			t.Fatalf("case %d: fields differ after a round trip:\n%+v\n%+v", i, s2, s)
		}
	}
	// A field set in Go lands where the kernel reads it.
	s := &Superblock{Magic: Magic, FeatureIncompat: Incompat64bit, BlocksCount: 5<<32 | 7, WtimeHi: 3, KbytesWritten: 1 << 40}
	b := s.Marshal()
	le := binary.LittleEndian
	if le.Uint32(b[0x4:]) != 7 || le.Uint32(b[0x150:]) != 5 || b[0x274] != 3 || le.Uint64(b[0x178:]) != 1<<40 {
		t.Errorf("fields misplaced: %x", b)
	}
}

func TestSuperblockErrors(t *testing.T) {
	b := make([]byte, SuperblockSize)
	if _, err := ParseSuperblock(b); !errors.Is(err, ErrNoSuperblock) {
		t.Errorf("zeros: got %v, want ErrNoSuperblock", err)
	}
	binary.LittleEndian.PutUint16(b[0x38:], Magic)
	binary.LittleEndian.PutUint32(b[0x18:], 7)
	if _, err := ParseSuperblock(b); !errors.Is(err, ErrNoSuperblock) {
		t.Errorf("128 KiB blocks: got %v, want ErrNoSuperblock", err)
	}
	if _, err := ParseSuperblock(b[:100]); !errors.Is(err, ErrNoSuperblock) {
		t.Errorf("short: got %v, want ErrNoSuperblock", err)
	}
	if _, err := ReadSuperblock(bytes.NewReader(make([]byte, 1500))); err == nil || errors.Is(err, ErrNoSuperblock) {
		t.Errorf("short read: got %v, want an I/O error", err)
	}
}

// Without the 64bit feature the high halves are not the kernel's and keep
// their bytes.
func TestSuperblock32(t *testing.T) {
	b := make([]byte, SuperblockSize)
	le := binary.LittleEndian
	le.PutUint16(b[0x38:], Magic)
	le.PutUint32(b[0x4:], 1000)
	le.PutUint32(b[0x150:], 0xDEAD)
	le.PutUint16(b[0xFE:], 64)
	s, err := ParseSuperblock(b)
	if err != nil {
		t.Fatal(err)
	}
	if s.BlocksCount != 1000 || s.GroupDescSize() != 32 {
		t.Errorf("got %d blocks, %d-byte descriptors; want 1000 and 32", s.BlocksCount, s.GroupDescSize())
	}
	s.BlocksCount = 2000
	if out := s.Marshal(); le.Uint32(out[0x4:]) != 2000 || le.Uint32(out[0x150:]) != 0xDEAD {
		t.Errorf("marshal: blocks_lo %d, blocks_hi %#x; want 2000, 0xdead", le.Uint32(out[0x4:]), le.Uint32(out[0x150:]))
	}
}

func TestGroupDescRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{32, 64} {
		for range 100 {
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			// Fields Put does not name: exclude bitmap and the reserved word.
			out := bytes.Clone(b)
			d := ParseGroupDesc(b)
			clear(out[0x14:0x18])
			if n == 64 {
				clear(out[0x34:0x38])
				clear(out[0x3C:0x40])
			}
			keep := bytes.Clone(out)
			d.Put(out)
			if !bytes.Equal(out, keep) {
				t.Fatalf("%d bytes: Put(Parse(b)) differs:\n%x\n%x", n, out, keep)
			}
		}
	}
}

func TestDxChecksumBounds(t *testing.T) {
	b := make([]byte, 4096)
	binary.LittleEndian.PutUint16(b[8:], 600) // limit beyond the block
	binary.LittleEndian.PutUint16(b[10:], 1)
	if err := SetDxChecksum(b, 8, 1); !errors.Is(err, ErrCorrupt) {
		t.Errorf("limit 600: got %v, want ErrCorrupt", err)
	}
	binary.LittleEndian.PutUint16(b[8:], 10)
	binary.LittleEndian.PutUint16(b[10:], 11)
	if err := SetDxChecksum(b, 8, 1); !errors.Is(err, ErrCorrupt) {
		t.Errorf("count above limit: got %v, want ErrCorrupt", err)
	}
}

// memTree is an extent tree in memory: block number -> bytes.
type memTree map[uint64][]byte

func (m memTree) read(n uint64) ([]byte, error) {
	b, ok := m[n]
	if !ok {
		return nil, errors.New("no such block")
	}
	return bytes.Clone(b), nil
}

func node(depth uint16, entries ...[]byte) []byte {
	b := make([]byte, 4096)
	ExtentHeader{Entries: uint16(len(entries)), Max: 340, Depth: depth}.Put(b)
	for i, e := range entries {
		copy(b[ExtentEntrySize*(1+i):], e)
	}
	return b
}

func ext(logical uint32, start uint64, n uint16) []byte {
	b := make([]byte, 12)
	Extent{logical, start, n}.Put(b)
	return b
}

func idx(logical uint32, leaf uint64) []byte {
	b := make([]byte, 12)
	ExtentIndex{logical, leaf}.Put(b)
	return b
}

func TestExtentWalk(t *testing.T) {
	m := memTree{
		10: node(1, idx(0, 20), idx(100, 21)),
		20: node(0, ext(0, 1000, 50), ext(50, 2000, MaxExtentLen+50)),
		21: node(0, ext(100, 3000, 1)),
	}
	root := node(2, idx(0, 10))[:60]
	binary.LittleEndian.PutUint16(root[4:], 4)
	var exts []Extent
	var nodes []uint64
	w := ExtentWalk{
		Read:   m.read,
		Extent: func(e Extent) error { exts = append(exts, e); return nil },
		Node:   func(n uint64, _ int, _ []byte) error { nodes = append(nodes, n); return nil },
	}
	if err := w.Walk(root); err != nil {
		t.Fatal(err)
	}
	want := []Extent{{0, 1000, 50}, {50, 2000, MaxExtentLen + 50}, {100, 3000, 1}}
	if len(exts) != 3 || exts[0] != want[0] || exts[1] != want[1] || exts[2] != want[2] {
		t.Errorf("extents: got %+v, want %+v", exts, want)
	}
	if exts[1].Blocks() != 50 {
		t.Errorf("unwritten extent: got %d blocks, want 50", exts[1].Blocks())
	}
	if len(nodes) != 3 || nodes[0] != 20 || nodes[1] != 21 || nodes[2] != 10 {
		t.Errorf("nodes: got %v, want [20 21 10] (children first)", nodes)
	}

	for name, bad := range map[string]memTree{
		"cycle":          {10: node(1, idx(0, 10))},
		"depth mismatch": {10: node(1, idx(0, 20)), 20: node(1, idx(0, 20))},
		"no magic":       {10: make([]byte, 4096)},
	} {
		if err := (ExtentWalk{Read: bad.read}).Walk(root); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: got %v, want ErrCorrupt", name, err)
		}
	}
	// A node claiming more entries than fit.
	over := node(0)
	binary.LittleEndian.PutUint16(over[2:], 400)
	if err := (ExtentWalk{Read: memTree{10: over}.read}).Walk(root); !errors.Is(err, ErrCorrupt) {
		t.Errorf("overflow: got %v, want ErrCorrupt", err)
	}
}
