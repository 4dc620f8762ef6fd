package ext4

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestGeometries builds images of awkward sizes (partial last groups that
// hold a flex group's tables, backup superblocks, groups too small to keep)
// and option variants, and checks them with e2fsck and dumpe2fs.
func TestGeometries(t *testing.T) {
	const g = blocksPerGrp
	for _, c := range []struct {
		name       string
		blocks     uint64 // requested
		inodes     uint32
		zeroSeed   bool
		wantBlocks uint64
		wantInodes uint64
	}{
		{"min", minBlocks, 0, false, minBlocks, 512},
		{"one group odd", 6891, 0, false, 6891, 1728},
		{"partial group 1", g + 100, 0, false, g + 100, 2 * 4112},
		{"group 1 too small", g + 10, 0, false, g, 8192},
		{"leader group 16 partial", 16*g + 1000, 0, false, 16*g + 1000, 17 * 7728},
		{"leader group 16 too small", 16*g + 300, 0, false, 16 * g, 16 * 8192},
		{"backup group 25 partial", 25*g + 100, 0, false, 25*g + 100, 26 * 7888},
		{"many inodes", 4 * g, 100000, false, 4 * g, 4 * 25008},
		{"few inodes", 4 * g, 100, false, 4 * g, 4 * 32},
		{"zero hash seed", 4 * g, 0, true, 4 * g, 4 * 8192},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := testOpts(int64(c.blocks) * blockSize)
			o.Inodes = c.inodes
			if c.zeroSeed {
				o.HashSeed = [16]byte{}
			}
			tree := sampleTree(40, false)
			if c.inodes == 100 || c.blocks == minBlocks {
				tree = tree[:20]
			}
			for i := range tree {
				if tree[i].h.Name == "medium" {
					tree[i].h.Size = 3 << 20
				}
			}
			if c.zeroSeed {
				for i := 0; i < 500; i++ {
					tree = append(tree, reg(fmt.Sprintf("many/seed-%d", i), 0o644, 0, 0))
				}
			}
			img, w := mustBuild(t, tree, o)
			if w.g.blocks != c.wantBlocks || w.g.inodes() != c.wantInodes {
				t.Errorf("geometry: got %d blocks, %d inodes, want %d, %d", w.g.blocks, w.g.inodes(), c.wantBlocks, c.wantInodes)
			}
			e2fsck(t, img)
			bin := testutil.NeedTool(t, "dumpe2fs")[0]
			out, err := exec.Command(bin, "-h", img).CombinedOutput()
			if err != nil {
				t.Fatalf("dumpe2fs: %v\n%s", err, out)
			}
			if want := fmt.Sprintf("Block count:              %d\n", w.g.blocks); !strings.Contains(string(out), want) {
				t.Errorf("dumpe2fs: want %q", want)
			}
		})
	}
}
