package ext4

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
)

// memDst records writes by block for reading extent trees back.
type memDst map[int64][]byte

func (m memDst) WriteAt(p []byte, off int64) (int, error) {
	for i := 0; i < len(p); i += blockSize {
		m[off/blockSize+int64(i/blockSize)] = append([]byte(nil), p[i:i+blockSize]...)
	}
	return len(p), nil
}

// readTree walks an extent tree like the kernel would, checking headers
// and tail checksums, and returns its extents.
func readTree(t *testing.T, m memDst, node []byte, seed uint32, wantDepth int, inInode bool) []extent {
	t.Helper()
	le := binary.LittleEndian
	if le.Uint16(node) != ondisk.ExtentMagic {
		t.Fatalf("bad extent magic %#x", le.Uint16(node))
	}
	n, max, depth := int(le.Uint16(node[2:])), int(le.Uint16(node[4:])), int(le.Uint16(node[6:]))
	if depth != wantDepth {
		t.Fatalf("depth: got %d, want %d", depth, wantDepth)
	}
	wantMax := blockExtents
	if inInode {
		wantMax = inodeExtents
	} else if got, want := le.Uint32(node[extentTailOff:]), ondisk.CRC32C(seed, node[:extentTailOff]); got != want {
		t.Fatalf("tree block checksum: got %#x, want %#x", got, want)
	}
	if max != wantMax || n > max || n == 0 {
		t.Fatalf("entries %d, max %d, want max %d", n, max, wantMax)
	}
	var out []extent
	for i := 0; i < n; i++ {
		e := node[12+12*i:]
		if depth == 0 {
			out = append(out, extent{le.Uint32(e), uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:])), uint32(le.Uint16(e[4:]))})
			continue
		}
		child := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		b, ok := m[int64(child)]
		if !ok {
			t.Fatalf("index points at unwritten block %d", child)
		}
		sub := readTree(t, m, b, seed, depth-1, false)
		if sub[0].logical != le.Uint32(e) {
			t.Fatalf("index logical %d, child starts at %d", le.Uint32(e), sub[0].logical)
		}
		out = append(out, sub...)
	}
	return out
}

func TestExtentTreeDepths(t *testing.T) {
	for _, n := range []int{0, 1, 4, 5, 340, 341, 1360, 1361, 340 * 340 * 4, 340*340*4 + 1} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			m := memDst{}
			w, err := NewWriter(m, testOpts(64<<30))
			if err != nil {
				t.Fatal(err)
			}
			exts := make([]extent, n)
			for i := range exts {
				// Fragmented: one-block extents two blocks apart.
				exts[i] = extent{uint32(i), 1<<32 + uint64(2*i), 1}
			}
			const ino = 100
			var iblock [60]byte
			tb, err := w.extentTree(&iblock, ino, exts)
			if err != nil {
				t.Fatal(err)
			}
			if tb != treeBlocks(n) {
				t.Fatalf("tree blocks: got %d, want %d", tb, treeBlocks(n))
			}
			depth := int(binary.LittleEndian.Uint16(iblock[6:]))
			if n == 0 {
				return
			}
			got := readTree(t, m, iblock[:], w.inodeSeed(ino), depth, true)
			if len(got) != n {
				t.Fatalf("got %d extents back, want %d", len(got), n)
			}
			for i := range got {
				if got[i] != exts[i] {
					t.Fatalf("extent %d: got %+v, want %+v", i, got[i], exts[i])
				}
			}
			t.Logf("%d extents: depth %d, %d tree blocks", n, depth, tb)
		})
	}
}
