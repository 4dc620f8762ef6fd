package ext4

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestGolden pins the bytes the Writer makes: a change to any on-disk
// structure (superblock, descriptors, inodes, extent trees, hash-tree
// directories, checksums, layout hints) changes a digest. The digests were
// recorded with `go test ./ext4 -run TestGolden -v` on main at fd62292 (the
// test prints what it got); an intended format change records new ones.
func TestGolden(t *testing.T) {
	twoLevel := []tfile{dir("d", 0o755)}
	for i := 0; i < 12000; i++ {
		twoLevel = append(twoLevel, reg(fmt.Sprintf("d/%05d-%s", i, strings.Repeat("y", 190)), 0o644, int64(i%3), byte(i)))
	}
	gen1Pkgs, gen2Pkgs := map[string]int{}, map[string]int{}
	for i := range 30 {
		gen1Pkgs[fmt.Sprintf("pkg%02d", i)] = 1
		gen2Pkgs[fmt.Sprintf("pkg%02d", i)] = 1
	}
	gen2Pkgs["pkg05"] = 2
	delete(gen2Pkgs, "pkg07")
	gen2Pkgs["pkg30"] = 1
	gen1, gen2 := storeGen(gen1Pkgs, 40, "top1"), storeGen(gen2Pkgs, 43, "top2")

	for _, c := range []struct {
		name  string
		build func(t *testing.T) string
		want  string
	}{
		{"sample", func(t *testing.T) string {
			img, _ := mustBuild(t, sampleTree(3000, false), testOpts(256<<20))
			return img
		}, "988a915ab8d61b617e5603a82d4e2176db6fee9ff66b87f1983b94f2716f1265"},
		{"extent-tree", func(t *testing.T) string {
			img, _ := mustBuild(t, sampleTree(50, true), testOpts(1<<30))
			return img
		}, "280540a345f5f7f9d1510afd5c15e6e2906da9005bea70a250a24fbf000afa51"},
		{"htree-two-levels", func(t *testing.T) string {
			img, _ := mustBuild(t, twoLevel, testOpts(256<<20))
			return img
		}, "40f3fcfe0ec1567402cf78d1e16e5f94c93fe4c7260ba0aac9bbb934f03e09d0"},
		{"previous", func(t *testing.T) string {
			opts := testOpts(128 << 20)
			_, w1 := buildUnits(t, gen1, opts)
			opts.Previous = keep(w1.Placements(), gen2)
			img, _ := buildUnits(t, gen2, opts)
			return img
		}, "c4c671c5f99a9d2fcfccdbeba2fd65f596b23a8078529468faeaac10438228e1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := c.build(t)
			if got := testutil.SHA256File(t, img); got != c.want {
				t.Errorf("sha256: got %s, want %s", got, c.want)
			}
		})
	}
}
