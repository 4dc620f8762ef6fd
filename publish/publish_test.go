package publish

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
)

const testSize = 24 << 20

// zstdSize is the zstd -3 size of the blocks of b that a does not have at
// the same offset: the floor for what a host holding a needs of b.
func zstdSize(t testing.TB, a, b []byte) int {
	var changed []byte
	for off := 0; off < len(b); off += BlockSize {
		end := min(off+BlockSize, len(b))
		if off >= len(a) || !bytes.Equal(a[off:end], b[off:end]) {
			changed = append(changed, b[off:end]...)
		}
	}
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(3)))
	return len(enc.EncodeAll(changed, nil))
}

func dirSize(t testing.TB, dir string) int64 {
	var n int64
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestPublishPullNginx: generation 1 and a layout-stable rebuild published
// to a directory, pulled over a real nginx into two host stores; the
// rebuild costs the host about the compressed size of what changed.
func TestPublishPullNginx(t *testing.T) {
	pub := t.TempDir()
	srv := startNginx(t, pub)
	g1 := testImage(1, testSize)
	g2 := rebuild(g1, 2, 300<<10)

	st1 := publishT(t, pub, "baseline", g1, PublishOptions{})
	t.Logf("gen1: %+v", *st1)
	if st1.NewBlocks != st1.Blocks || st1.Deltas != 0 {
		t.Fatalf("first publish: %d of %d blocks new, %d deltas", st1.NewBlocks, st1.Blocks, st1.Deltas)
	}
	hostA := t.TempDir()
	link := filepath.Join(t.TempDir(), "virt", "baseline.qcow2")
	ps, err := pullT(t, srv.URL, hostA, "baseline", PullOptions{Link: link})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pull gen1: %+v", *ps)
	p1 := checkCurrent(t, hostA, "baseline", g1)
	if l, _ := os.Readlink(link); l != p1 {
		t.Fatalf("link -> %q, want %q", l, p1)
	}
	if ps.Bytes > st1.PackBytes+st1.IndexBytes+st1.RecipeBytes+4096 {
		t.Fatalf("first pull fetched %d bytes, more than everything published (%d)", ps.Bytes, st1.UploadedBytes)
	}

	size1 := dirSize(t, pub)
	st2 := publishT(t, pub, "baseline", g2, PublishOptions{})
	grew := dirSize(t, pub) - size1
	floor := zstdSize(t, g1, g2)
	t.Logf("gen2: %+v; storage grew %d bytes; zstd -3 of the changed blocks %d", *st2, grew, floor)
	if st2.Deltas != 1 {
		t.Fatalf("gen2 has %d deltas, want 1", st2.Deltas)
	}
	if float64(grew) > 1.1*float64(floor)+4096 {
		t.Errorf("storage grew %d bytes, more than 1.1 x %d (the compressed new blocks)", grew, floor)
	}

	before := srv.Requests(t)
	ps, err = pullT(t, srv.URL, hostA, "baseline", PullOptions{Link: link})
	if err != nil {
		t.Fatal(err)
	}
	served := srv.Requests(t) - before
	t.Logf("pull gen2: %+v; nginx served %d requests", *ps, served)
	p2 := checkCurrent(t, hostA, "baseline", g2)
	if l, _ := os.Readlink(link); l != p2 {
		t.Fatalf("link -> %q, want %q", l, p2)
	}
	if !ps.Delta {
		t.Error("the pull of gen2 did not use the delta recipe")
	}
	if float64(ps.Bytes) > 1.5*float64(floor)+64<<10 {
		t.Errorf("pull of gen2 fetched %d bytes, floor %d", ps.Bytes, floor)
	}
	if int64(served) != ps.Requests || served > 8 {
		t.Errorf("nginx served %d requests, the puller counted %d; want at most 8", served, ps.Requests)
	}
	// Both generations stay; pulling again changes nothing.
	ps, err = pullT(t, srv.URL, hostA, "baseline", PullOptions{})
	if err != nil || !ps.AlreadyHeld || ps.Requests != 1 {
		t.Fatalf("pull again: %+v, %v", ps, err)
	}
	if _, err := os.Stat(p1); err != nil {
		t.Fatalf("generation 1 is gone: %v", err)
	}

	// A fresh host gets gen2 from the full recipe.
	hostB := t.TempDir()
	ps, err = pullT(t, srv.URL, hostB, "baseline", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ps.Delta {
		t.Error("a fresh host used a delta")
	}
	checkCurrent(t, hostB, "baseline", g2)
}

// TestPublishUnchanged: publishing the same image again uploads no pack.
func TestPublishUnchanged(t *testing.T) {
	pub := t.TempDir()
	g1 := testImage(3, 4<<20)
	publishT(t, pub, "a", g1, PublishOptions{})
	st := publishT(t, pub, "a", g1, PublishOptions{})
	if st.NewBlocks != 0 || st.PackBytes != 0 {
		t.Fatalf("republish: %+v", *st)
	}
	// Another name shares the packs.
	st = publishT(t, pub, "b", g1, PublishOptions{})
	if st.NewBlocks != 0 {
		t.Fatalf("publish under another name: %d new blocks", st.NewBlocks)
	}
}

// TestPullFromFile pulls straight from a directory, and from a
// generation two rebuilds behind through a delta.
func TestPullFromFile(t *testing.T) {
	pub := t.TempDir()
	g1 := testImage(4, 8<<20)
	g2 := rebuild(g1, 5, 64<<10)
	g3 := rebuild(g2, 6, 64<<10)
	host := t.TempDir()
	publishT(t, pub, "x", g1, PublishOptions{})
	if _, err := pullT(t, "file://"+pub, host, "x", PullOptions{}); err != nil {
		t.Fatal(err)
	}
	publishT(t, pub, "x", g2, PublishOptions{})
	st := publishT(t, pub, "x", g3, PublishOptions{})
	if st.Deltas != 2 {
		t.Fatalf("gen3: %d deltas, want 2", st.Deltas)
	}
	ps, err := pullT(t, "file://"+pub, host, "x", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !ps.Delta {
		t.Error("no delta from gen1 to gen3")
	}
	checkCurrent(t, host, "x", g3)
}

func TestRecipeRoundTrip(t *testing.T) {
	pub := t.TempDir()
	g1 := testImage(7, 2<<20)
	publishT(t, pub, "r", g1, PublishOptions{FrameBlocks: 3})
	tg := dirTargetT(t, pub)
	p, err := loadPublished(context.Background(), tg, "")
	if err != nil {
		t.Fatal(err)
	}
	m, err := rebuildFull(context.Background(), tg, p, ID(imageOf(g1).Digest))
	if err != nil {
		t.Fatal(err)
	}
	if m.Digest != imageOf(g1).Digest || len(m.Blocks) != int(manifest.BlockCount(int64(len(g1)))) {
		t.Fatal("rebuilt block list differs")
	}
	for _, f := range p.packs[0].Frames {
		if len(f.Blocks) > 3 {
			t.Fatalf("frame of %d blocks with FrameBlocks 3", len(f.Blocks))
		}
	}
	if !strings.HasPrefix(string(mustRead(t, filepath.Join(pub, "r", "latest"))), pointerHeader) {
		t.Fatal("no pointer")
	}
}

func mustRead(t testing.TB, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPublishIndexCache: the publisher keeps pack indexes it read; a
// damaged cached copy is ignored and replaced.
func TestPublishIndexCache(t *testing.T) {
	pub, cache := t.TempDir(), t.TempDir()
	g1 := testImage(91, 2<<20)
	g2 := rebuild(g1, 92, 32<<10)
	st := publishT(t, pub, "c", g1, PublishOptions{IndexCache: cache})
	publishT(t, pub, "c", g2, PublishOptions{IndexCache: cache})
	cached := filepath.Join(cache, st.PublishedPack.String()+".idx")
	if !bytes.Equal(mustRead(t, cached), mustRead(t, filepath.Join(pub, indexKey(st.PublishedPack)))) {
		t.Fatal("index not cached")
	}
	writeFile(t, cached, []byte("garbage"))
	st3 := publishT(t, pub, "c", rebuild(g2, 93, 32<<10), PublishOptions{IndexCache: cache})
	if st3.NewBlocks == 0 || st3.NewBlocks > 10 {
		t.Fatalf("publish with a damaged cache: %+v", *st3)
	}
	if !bytes.Equal(mustRead(t, cached), mustRead(t, filepath.Join(pub, indexKey(st.PublishedPack)))) {
		t.Fatal("damaged cache entry not replaced")
	}
}
