package ondisk

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// FuzzSuperblock: any 1024 bytes parse or fail cleanly; what parses
// marshals back to the same bytes, but for a recomputed checksum.
func FuzzSuperblock(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	for range 4 {
		f.Add(randomSuper(r))
	}
	f.Add(make([]byte, SuperblockSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSuperblock(b)
		if err != nil {
			return
		}
		out := s.Marshal()
		if s.MetadataCsum() {
			copy(out[superCsumOffset:], b[superCsumOffset:])
		}
		if !bytes.Equal(out, b[:SuperblockSize]) {
			t.Fatal("Marshal(Parse(b)) differs from b")
		}
		_ = s.Groups()
		_ = s.GroupDescOffset(uint32(s.Groups()))
	})
}

// FuzzExtentWalk walks trees whose every block is the same fuzzed bytes:
// it must end (cycles included) without a panic, and report only extents
// of leaf nodes.
func FuzzExtentWalk(f *testing.F) {
	leaf := node(0, ext(0, 5, 3), ext(3, 9, MaxExtentLen+1))[:256]
	index := node(1, idx(0, 1), idx(9, 1))[:256]
	root := node(1, idx(0, 1))[:60]
	f.Add(root, leaf)
	f.Add(root, index)
	f.Add(leaf[:60], leaf)
	f.Fuzz(func(t *testing.T, root, blk []byte) {
		if len(blk) > 256 {
			t.Skip()
		}
		calls := 0
		w := ExtentWalk{
			Read: func(uint64) ([]byte, error) {
				if calls++; calls > 10000 {
					t.Skip() // deep but finite: the budget is tested elsewhere
				}
				return bytes.Clone(blk), nil
			},
			Node: func(_ uint64, _ int, b []byte) error {
				if binary.LittleEndian.Uint16(b) != ExtentMagic {
					t.Fatal("Node called for a block without the magic")
				}
				return nil
			},
		}
		_ = w.Walk(root)
	})
}
