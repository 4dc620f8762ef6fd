package ext4

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"testing"
)

// unitTree is a tree written in placement units, like a Nix store: unit ""
// holds the directories above the store, then one unit per store path.
type unitTree []struct {
	name  string
	files []tfile
}

func (u unitTree) flat() []tfile {
	var out []tfile
	for _, x := range u {
		out = append(out, x.files...)
	}
	return out
}

// pkg is a store-path-shaped unit: directories, files of a few sizes (one
// with a hole-free multi-block body), fast and slow symlinks and a hard link.
func pkg(name string, version int, size int64) []tfile {
	d := "nix/store/" + name
	v := byte(version)
	// In NAR order (names sorted), as imagebuild writes store paths.
	return []tfile{
		dir(d, 0o555),
		dir(d+"/bin", 0o555),
		reg(d+"/bin/"+name[:4], 0o555, size, 1+v),
		reg(d+"/bin/tool", 0o555, 10000+int64(version), 2+v),
		hardlink(d+"/bin/tool-link", d+"/bin/tool"),
		reg(d+"/empty", 0o444, 0, 0),
		dir(d+"/lib", 0o555),
		symlink(d+"/lib/far", "/nix/store/"+name+"/lib/"+fmt.Sprintf("%080d", version)),
		reg(d+"/lib/lib.so", 0o444, 3*size/2+int64(version), 3+v),
		symlink(d+"/lib/lib.so.1", "lib.so"),
	}
}

// storeGen is one generation: packages by name (the version goes into the
// name, as a store path hash would), a database file of dbBlocks blocks
// and a symlink to the "toplevel".
func storeGen(pkgs map[string]int, dbBlocks int64, top string) unitTree {
	t := unitTree{{"", []tfile{{h: Header{Name: ".", Type: TypeDir, Mode: 0o755, Mtime: mt}}, dir("nix", 0o755), dir("nix/store", 0o1775)}}}
	names := make([]string, 0, len(pkgs))
	for n := range pkgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v := pkgs[n]
		h := sha256.Sum256([]byte(fmt.Sprint(n, v)))
		full := fmt.Sprintf("%x-%s-%d", h[:8], n, v)
		t = append(t, struct {
			name  string
			files []tfile
		}{full, pkg(full, v, int64(len(n))*9000+int64(v)*5000)})
	}
	t = append(t,
		struct {
			name  string
			files []tfile
		}{"nix/var", []tfile{dir("nix/var", 0o755), dir("nix/var/db", 0o755)}},
		struct {
			name  string
			files []tfile
		}{"nix/var/db/db", []tfile{reg("nix/var/db/db", 0o644, dbBlocks*blockSize, byte(dbBlocks))}},
		struct {
			name  string
			files []tfile
		}{"system", []tfile{symlink("system", "/nix/store/"+top)}},
	)
	return t
}

// buildUnits writes t into a new sparse file of opts.Size.
func buildUnits(t testing.TB, tree unitTree, opts Options) (string, *Writer) {
	t.Helper()
	p, f := sparseFile(t, opts.Size)
	defer f.Close()
	w, err := NewWriter(f, opts)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<16)
	for _, u := range tree {
		if u.name != "" {
			if err := w.BeginUnit(u.name); err != nil {
				t.Fatal(err)
			}
		}
		for i := range u.files {
			e := &u.files[i]
			if err := w.WriteHeader(&e.h); err != nil {
				t.Fatalf("%s: %v", e.h.Name, err)
			}
			if e.h.Type == TypeReg && e.h.Size > 0 {
				if _, err := io.CopyBuffer(w, content(e.h.Size, e.seed), buf); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p, w
}

// keep returns the placements of prev for the units of next.
func keep(prev map[string]Placement, next unitTree) map[string]Placement {
	out := map[string]Placement{}
	for _, u := range next {
		if p, ok := prev[u.name]; ok {
			out[u.name] = p
		}
	}
	if p, ok := prev[""]; ok {
		out[""] = p
	}
	return out
}

type blockHashes [][32]byte

func hashBlocks(t testing.TB, img string) blockHashes {
	t.Helper()
	d, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	var out blockHashes
	for off := 0; off < len(d); off += blockSize {
		out = append(out, sha256.Sum256(d[off:off+blockSize]))
	}
	return out
}

func diffBlocks(a, b blockHashes) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

func placedBlocks(p Placement) uint64 {
	n := uint64(0)
	for _, r := range p.Blocks {
		n += r.Len
	}
	return n
}

func TestPreviousGeneration(t *testing.T) {
	opts := testOpts(128 << 20)
	gen1Pkgs := map[string]int{}
	for i := range 30 {
		gen1Pkgs[fmt.Sprintf("pkg%02d", i)] = 1
	}
	gen1 := storeGen(gen1Pkgs, 40, "top1")
	img1, w1 := buildUnits(t, gen1, opts)
	e2fsck(t, img1)

	gen2Pkgs := map[string]int{}
	for k, v := range gen1Pkgs {
		gen2Pkgs[k] = v
	}
	gen2Pkgs["pkg05"] = 2 // changed: a new store path, bigger
	delete(gen2Pkgs, "pkg07")
	gen2Pkgs["pkg30"] = 1 // added
	gen2 := storeGen(gen2Pkgs, 43, "top2")
	prev := keep(w1.Placements(), gen2)
	o2 := opts
	o2.Previous = prev
	img2, w2 := buildUnits(t, gen2, o2)
	e2fsck(t, img2)
	compareTree(t, rdump(t, img2), gen2.flat(), checkFlags{})

	p1, p2 := w1.Placements(), w2.Placements()
	var newBlocks uint64
	for _, u := range gen2 {
		if _, ok := p1[u.name]; !ok {
			newBlocks += placedBlocks(p2[u.name])
			continue
		}
		if u.name == "nix/var/db/db" || u.name == "system" || u.name == "" {
			continue // changed content
		}
		if !reflect.DeepEqual(p1[u.name], p2[u.name]) {
			t.Errorf("unit %s moved: got %+v, want %+v", u.name, p2[u.name], p1[u.name])
		}
	}
	// The changed and added units fill the removed unit's inodes and blocks.
	removed := p1[gen1[8].name] // pkg07
	if !holds(p2, removed.Inodes[0].Start, func(p Placement) []Range { return p.Inodes }) {
		t.Errorf("the removed unit's first inode %d was not reused", removed.Inodes[0].Start)
	}
	if !holds(p2, removed.Blocks[0].Start, func(p Placement) []Range { return p.Blocks }) {
		t.Errorf("the removed unit's first block %d was not reused", removed.Blocks[0].Start)
	}

	h1, h2 := hashBlocks(t, img1), hashBlocks(t, img2)
	diff := diffBlocks(h1, h2)
	// New data plus: superblock, descriptors, bitmaps, a few inode table
	// blocks, the store directory, the database's new blocks, the symlink.
	bound := 2*int(newBlocks) + 32
	t.Logf("gen2 from gen1: %d of %d blocks differ, %d new data blocks, bound %d", diff, len(h1), newBlocks, bound)
	if diff > bound {
		t.Errorf("%d blocks differ, want at most %d (2 x %d new + 32)", diff, bound, newBlocks)
	}
	// Without the hints the same tree moves much more: the test can fail.
	img3, _ := buildUnits(t, gen2, opts)
	if fresh := diffBlocks(h1, hashBlocks(t, img3)); fresh <= bound {
		t.Errorf("a fresh layout differs in only %d blocks; the bound %d proves nothing", fresh, bound)
	} else {
		t.Logf("fresh layout: %d blocks differ", fresh)
	}

	// Deterministic: the same tree and placements give the same bytes.
	img4, _ := buildUnits(t, gen2, o2)
	a, _ := os.ReadFile(img2)
	b, _ := os.ReadFile(img4)
	if !bytes.Equal(a, b) {
		t.Error("two builds with the same previous placements differ")
	}
}

func holds(ps map[string]Placement, n uint64, f func(Placement) []Range) bool {
	for _, p := range ps {
		for _, r := range f(p) {
			if n >= r.Start && n < r.Start+r.Len {
				return true
			}
		}
	}
	return false
}

// TestTenGenerations chains generations, each from the previous one's
// placements, changing, adding and removing packages and growing or
// shrinking the database: every image is valid and each would push little.
func TestTenGenerations(t *testing.T) {
	opts := testOpts(96 << 20)
	pkgs := map[string]int{}
	for i := range 20 {
		pkgs[fmt.Sprintf("pkg%02d", i)] = 1
	}
	tree := storeGen(pkgs, 30, "top0")
	img, w := buildUnits(t, tree, opts)
	e2fsck(t, img)
	seen := map[[32]byte]bool{}
	for _, h := range hashBlocks(t, img) {
		seen[h] = true
	}
	next := 20
	for gen := 1; gen <= 10; gen++ {
		pkgs[fmt.Sprintf("pkg%02d", (gen*7)%next)]++
		pkgs[fmt.Sprintf("pkg%02d", (gen*3+1)%next)]++
		delete(pkgs, fmt.Sprintf("pkg%02d", (gen*5+2)%next))
		pkgs[fmt.Sprintf("pkg%02d", next)] = 1
		next++
		db := int64(30 + gen%4*3)
		tree2 := storeGen(pkgs, db, fmt.Sprint("top", gen))
		o := opts
		o.Previous = keep(w.Placements(), tree2)
		img2, w2 := buildUnits(t, tree2, o)
		e2fsck(t, img2)
		p1 := w.Placements()
		var newBlocks uint64
		for _, u := range tree2 {
			if _, ok := p1[u.name]; !ok {
				newBlocks += placedBlocks(w2.Placements()[u.name])
			}
		}
		send := 0
		for _, h := range hashBlocks(t, img2) {
			if !seen[h] {
				send++
				seen[h] = true
			}
		}
		bound := 2*int(newBlocks) + 32
		t.Logf("generation %d: %d blocks to push, %d new data blocks", gen, send, newBlocks)
		if send > bound {
			t.Errorf("generation %d: %d blocks to push, want at most %d", gen, send, bound)
		}
		if gen == 10 {
			compareTree(t, rdump(t, img2), tree2.flat(), checkFlags{})
		}
		w = w2
	}
}

func TestPreviousInvalid(t *testing.T) {
	opts := testOpts(64 << 20)
	g, err := newGeometry(opts)
	if err != nil {
		t.Fatal(err)
	}
	meta := g.reserved[0]
	for _, c := range []struct {
		name string
		prev map[string]Placement
	}{
		{"shared blocks", map[string]Placement{"a": {Blocks: []Range{{5000, 10}}}, "b": {Blocks: []Range{{5009, 1}}}}},
		{"shared inodes", map[string]Placement{"a": {Inodes: []Range{{20, 5}}}, "b": {Inodes: []Range{{24, 1}}}}},
		{"metadata", map[string]Placement{"a": {Blocks: []Range{{meta.start, 1}}}}},
		{"past the end", map[string]Placement{"a": {Blocks: []Range{{g.blocks - 1, 2}}}}},
		{"overflow", map[string]Placement{"a": {Blocks: []Range{{5000, ^uint64(0)}}}}},
		{"reserved inode", map[string]Placement{"a": {Inodes: []Range{{lostFoundIno, 1}}}}},
		{"inode past the end", map[string]Placement{"a": {Inodes: []Range{{g.inodes(), 2}}}}},
		{"empty run", map[string]Placement{"a": {Blocks: []Range{{5000, 0}}}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := opts
			o.Previous = c.prev
			if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("Validate: got %v, want ErrInvalidOptions", err)
			}
			if _, err := NewWriter(discard{}, o); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("NewWriter: got %v, want ErrInvalidOptions", err)
			}
		})
	}
}

// TestPreviousWithoutHintsUnchanged: units without Previous lay out as a
// plain Writer does, byte for byte.
func TestPreviousWithoutHintsUnchanged(t *testing.T) {
	pkgs := map[string]int{"a": 1, "bb": 2, "ccc": 3}
	tree := storeGen(pkgs, 5, "top")
	opts := testOpts(64 << 20)
	a, _ := buildUnits(t, tree, opts)
	b, _ := mustBuild(t, tree.flat(), opts)
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if !bytes.Equal(da, db) {
		t.Error("units change the layout of a build without previous placements")
	}
}
