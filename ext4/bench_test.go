package ext4

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// storeTree is shaped like a Nix store: one directory with `top` package
// directories, each with files, `files` entries in all.
func storeTree(top, files int) []tfile {
	tr := []tfile{dir("nix", 0o755), dir("nix/store", 0o1775)}
	per := max(1, (files-top)/top)
	n := len(tr)
	for i := 0; i < top && n < files; i++ {
		d := fmt.Sprintf("nix/store/%032x-package-%d", uint64(i)*0x9E3779B97F4A7C15, i)
		tr = append(tr, dir(d, 0o555))
		n++
		for j := 0; j < per && n < files; j++ {
			tr = append(tr, reg(fmt.Sprintf("%s/file-%d", d, j), 0o444, int64(j*100), byte(j)))
			n++
		}
	}
	return tr
}

func BenchmarkWriter(b *testing.B) {
	for _, c := range []struct{ top, files int }{{4000, 10000}, {20000, 50000}} {
		tree := storeTree(c.top, c.files)
		b.Run(fmt.Sprintf("files=%d,dir=%d", c.files, c.top), func(b *testing.B) {
			buf := make([]byte, 64<<10)
			for b.Loop() {
				w, err := NewWriter(discard{}, testOpts(8<<30))
				if err != nil {
					b.Fatal(err)
				}
				for i := range tree {
					e := &tree[i]
					if err := w.WriteHeader(&e.h); err != nil {
						b.Fatal(err)
					}
					if e.h.Size > 0 {
						io.CopyBuffer(w, content(e.h.Size, e.seed), buf)
					}
				}
				if err := w.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestHtreeTwoLevels builds a directory whose leaves overflow one dx_root
// (more than 507 leaf blocks), so it gets a second index level.
func TestHtreeTwoLevels(t *testing.T) {
	tr := []tfile{dir("d", 0o755)}
	const n = 12000
	for i := 0; i < n; i++ {
		tr = append(tr, reg(fmt.Sprintf("d/%05d-%s", i, strings.Repeat("y", 190)), 0o644, 0, 0))
	}
	img, _ := mustBuild(t, tr, testOpts(256<<20))
	e2fsck(t, img)
	bin := testutil.NeedTool(t, "debugfs")[0]
	out, err := exec.Command(bin, "-R", "htree d", img).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Indirect levels: 1") {
		t.Fatalf("debugfs htree d: want 1 indirect level: %v\n%.2000s", err, out)
	}
	t.Run("mount", func(t *testing.T) {
		mnt := mountRO(t, img)
		// Lookups by name go through the index.
		for i := 0; i < n; i += 7 {
			if _, err := os.Lstat(filepath.Join(mnt, tr[1+i].h.Name)); err != nil {
				t.Fatal(err)
			}
		}
		ents, err := os.ReadDir(filepath.Join(mnt, "d"))
		if err != nil || len(ents) != n {
			t.Fatalf("readdir: got %d entries (%v), want %d", len(ents), err, n)
		}
	})
}

func TestPlanner(t *testing.T) {
	for _, c := range []struct {
		name string
		tree []tfile
	}{
		{"sample", sampleTree(2000, true)},
		{"store", storeTree(3000, 9000)},
		{"two-level", func() []tfile {
			tr := []tfile{dir("d", 0o755)}
			for i := 0; i < 11000; i++ {
				tr = append(tr, reg(fmt.Sprintf("d/%05d-%s", i, strings.Repeat("y", 190)), 0o644, 1, 0))
			}
			return tr
		}()},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := NewPlanner(testOpts(0))
			for i := range c.tree {
				p.Add(&c.tree[i].h)
			}
			pu := p.Usage()
			w, err := NewWriter(discard{}, testOpts(2<<30))
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			for i := range c.tree {
				e := &c.tree[i]
				if err := w.WriteHeader(&e.h); err != nil {
					t.Fatal(err)
				}
				if e.h.Size > 0 {
					io.CopyBuffer(w, content(e.h.Size, e.seed), buf)
				}
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			wu := w.Usage()
			if pu.Inodes != wu.Inodes || pu.Blocks < wu.Blocks || pu.Blocks > wu.Blocks+wu.Blocks/1000+8 {
				t.Fatalf("planner usage %+v, writer usage %+v: want equal inodes and blocks at least the writer's, within 0.1%%", pu, wu)
			}
			// The planned size is enough.
			if _, _, err := build(t, c.tree, testOpts(MinSize(pu))); err != nil {
				t.Fatalf("build at MinSize(planned): %v", err)
			}
		})
	}
}
