package ext4

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// TestHtreeHashCollision puts two names with the same hash on both sides of
// a leaf boundary, so the second leaf's index entry carries the collision
// bit, and checks the image with e2fsck and kernel lookups.
func TestHtreeHashCollision(t *testing.T) {
	opts := testOpts(64 << 20)
	var seed [4]uint32
	for i := range seed {
		seed[i] = binary.LittleEndian.Uint32(opts.HashSeed[4*i:])
	}
	// Names of 8 bytes: 16-byte entries, 255 to a leaf.
	seen := map[uint32]string{}
	var a, b string
	var h uint32
	for i := 0; a == ""; i++ {
		n := fmt.Sprintf("c%07d", i)
		hh, _ := halfMD4Hash(n, seed)
		if o, ok := seen[hh]; ok && hh > 1<<31 {
			a, b, h = o, n, hh
		}
		seen[hh] = n
	}
	var fillers []string
	for hh, n := range seen {
		if hh < h && n != a {
			fillers = append(fillers, n)
		}
	}
	sort.Strings(fillers)
	fillers = fillers[:254]
	tree := []tfile{dir("d", 0o755)}
	for _, n := range append(fillers, a, b) {
		tree = append(tree, reg("d/"+n, 0o644, 0, 0))
	}

	// The collision bit is where it should be.
	d := &dirInfo{ino: 12, parent: 2}
	for _, n := range append(fillers, a, b) {
		d.entries = append(d.entries, dirent{n, 13, ftReg})
	}
	blocks, indexed, err := buildDir(d, 0, seed)
	if err != nil || !indexed || len(blocks) != 3 {
		t.Fatalf("buildDir: %d blocks, indexed %v, %v; want 3, true", len(blocks), indexed, err)
	}
	if got := binary.LittleEndian.Uint32(blocks[0][40:]); got != h|1 {
		t.Fatalf("second leaf's hash: got %#x, want %#x", got, h|1)
	}

	img, _ := mustBuild(t, tree, opts)
	e2fsck(t, img)
	t.Run("mount", func(t *testing.T) {
		mnt := mountRO(t, img)
		for _, n := range []string{a, b, fillers[0], fillers[253]} {
			if _, err := os.Lstat(filepath.Join(mnt, "d", n)); err != nil {
				t.Errorf("lookup %s (hash %#x): %v", n, h, err)
			}
		}
	})
}
