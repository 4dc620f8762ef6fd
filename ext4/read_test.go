package ext4

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// storeUnit names the units of a storeGen tree as buildUnits makes them.
func storeUnit(name string) string {
	switch {
	case name == "." || name == "nix" || name == "nix/store":
		return ""
	case strings.HasPrefix(name, "nix/store/"):
		return strings.SplitN(name, "/", 4)[2]
	case name == "nix/var" || name == "nix/var/db":
		return "nix/var"
	}
	return name
}

func TestReadPlacements(t *testing.T) {
	opts := testOpts(768 << 20)
	pkgs := map[string]int{}
	for i := range 12 {
		pkgs[string(rune('a'+i))+"pkg"] = i
	}
	tree := storeGen(pkgs, 17, "top")
	// A big file with an extent tree block (more than 4 extents): data
	// across group metadata.
	fs := tree[1].files
	big := reg(fs[0].h.Name+"/big", 0o444, 4*maxExtentLen*blockSize+5, 7)
	tree[1].files = append([]tfile{fs[0], big}, fs[1:]...)
	img, w := buildUnits(t, tree, opts)
	if in := w.inodes[w.paths[big.h.Name]-1]; in.iblock[6] == 0 {
		t.Fatal("the big file has no extent tree block; the test tests less than it says")
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, ps, err := ReadPlacements(f, storeUnit)
	if err != nil {
		t.Fatal(err)
	}
	if got.Size != opts.Size || got.UUID != opts.UUID || got.HashSeed != opts.HashSeed || got.Label != opts.Label || got.Time != opts.Time {
		t.Errorf("options: got %+v, want %+v", got, opts)
	}
	want := w.Placements()
	if !reflect.DeepEqual(ps, want) {
		for n := range want {
			if !reflect.DeepEqual(ps[n], want[n]) {
				t.Errorf("unit %q: got %+v, want %+v", n, ps[n], want[n])
			}
		}
		for n := range ps {
			if _, ok := want[n]; !ok {
				t.Errorf("unit %q read, not written", n)
			}
		}
	}
	// Kept through what was read, the next generation has the same bytes
	// as kept through the Writer's report.
	pkgs["cpkg"]++
	delete(pkgs, "epkg")
	next := storeGen(pkgs, 19, "top2")
	next[1].files = tree[1].files
	o1, o2 := opts, opts
	o1.Previous, o2.Previous = keep(want, next), keep(ps, next)
	a, _ := buildUnits(t, next, o1)
	b, _ := buildUnits(t, next, o2)
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if !bytes.Equal(da, db) {
		t.Error("previous placements read from the image give other bytes than the Writer's")
	}
}

// TestReadPlacementsCorrupt: damaged metadata gives an error, never a
// panic or a hang.
func TestReadPlacementsCorrupt(t *testing.T) {
	pkgs := map[string]int{"a": 1, "b": 2}
	img, _ := buildUnits(t, storeGen(pkgs, 3, "top"), testOpts(16<<20))
	good, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ReadPlacements(bytes.NewReader(make([]byte, 1<<20)), storeUnit); !errors.Is(err, ErrNotExt4) {
		t.Errorf("zeros: got %v, want ErrNotExt4", err)
	}
	// The blocks that hold metadata: superblock, descriptors, inode
	// tables, directories and extent trees live in the first blocks.
	var meta []int
	for b := 0; b*blockSize < len(good); b++ {
		if !zeros.All(good[b*blockSize : (b+1)*blockSize]) {
			meta = append(meta, b)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	bad := make([]byte, len(good))
	for range 2000 {
		copy(bad, good)
		for range 1 + rng.IntN(4) {
			b := meta[rng.IntN(len(meta))]
			bad[b*blockSize+rng.IntN(blockSize)] ^= byte(1 + rng.IntN(255))
		}
		ReadPlacements(bytes.NewReader(bad), storeUnit)
	}
}
