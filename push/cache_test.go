package push

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// distinctNonZero counts the distinct non-zero blocks of images.
func distinctNonZero(t *testing.T, images ...[]byte) int64 {
	seen := map[manifest.Hash]bool{manifest.ZeroHash(): true}
	for _, b := range images {
		for _, h := range source(t, b).Blocks {
			seen[h] = true
		}
	}
	return int64(len(seen) - 1)
}

// gen2Of changes three blocks of gen1 and moves a 64 KiB stretch.
func gen2Of(gen1 []byte) []byte {
	gen2 := bytes.Clone(gen1)
	for _, b := range []int{3, 700, 1500} {
		rand.New(rand.NewSource(int64(b))).Read(gen2[b*manifest.BlockSize : (b+1)*manifest.BlockSize])
	}
	copy(gen2[5<<20+4096:], gen1[2<<20:2<<20+64<<10])
	return gen2
}

func TestPushReceivedBytes(t *testing.T) {
	gen1 := testImage(1, imgSize)
	gen2 := gen2Of(gen1)
	other := testImage(2, imgSize/2)
	for _, tc := range []struct {
		name         string
		cached       [][]byte // in the sender's cache
		host         [][]byte // pushed before, in order
		maxReceived  int64    // bound on the host's answer
		indexEntries int64
		cachedGens   int
	}{
		// Without a cache: 3 bytes per distinct non-zero host block.
		{name: "no cache", host: [][]byte{gen1}, maxReceived: 3*distinctNonZero(t, gen1)*21/20 + 1024,
			indexEntries: distinctNonZero(t, gen1)},
		// The sender knows the host's generation: the reply only.
		{name: "cache hit", cached: [][]byte{gen1}, host: [][]byte{gen1}, maxReceived: 1024, cachedGens: 1},
		// The sender knows one of two: an index of the other's own blocks.
		{name: "partial cache", cached: [][]byte{gen1}, host: [][]byte{other, gen1},
			maxReceived: 3*distinctNonZero(t, other)*21/20 + 1024, indexEntries: distinctNonZero(t, other), cachedGens: 1},
		// The cache knows images the host does not hold: a full index.
		{name: "cache miss", cached: [][]byte{other}, host: [][]byte{gen1}, maxReceived: 3*distinctNonZero(t, gen1)*21/20 + 1024,
			indexEntries: distinctNonZero(t, gen1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host := &store.Store{Dir: t.TempDir()}
			cache := &Cache{Dir: t.TempDir()}
			for _, b := range tc.cached {
				if err := cache.Put(source(t, b)); err != nil {
					t.Fatal(err)
				}
			}
			for _, b := range tc.host {
				push(t, host, b, Options{})
			}
			st := push(t, host, gen2, Options{Cache: cache})
			checkCurrent(t, host, "baseline", gen2)
			t.Logf("sent %d received %d: %+v", st.Sent, st.Received, st)
			if st.Received > tc.maxReceived {
				t.Errorf("received %d bytes, want at most %d", st.Received, tc.maxReceived)
			}
			if st.IndexEntries != tc.indexEntries || st.CachedGens != tc.cachedGens {
				t.Errorf("got %d index entries and %d cached generations, want %d and %d", st.IndexEntries, st.CachedGens, tc.indexEntries, tc.cachedGens)
			}
			if st.LiteralBlocks != 3 || st.ResentBlocks != 0 {
				t.Errorf("got %d literal and %d re-sent blocks, want 3 and 0", st.LiteralBlocks, st.ResentBlocks)
			}
			if st.Sent > 3*manifest.BlockSize+4096 {
				t.Errorf("sent %d bytes, want at most %d", st.Sent, 3*manifest.BlockSize+4096)
			}
		})
	}
}

// TestStaleCache: the host's generation no longer matches the manifest the
// sender cached (blocks of it were damaged on the host). The copies from
// those blocks fail the host's check and travel again as literals.
func TestStaleCache(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	host := &store.Store{Dir: t.TempDir()}
	cache := &Cache{Dir: t.TempDir()}
	gen1 := testImage(1, imgSize)
	push(t, host, gen1, Options{})
	if err := cache.Put(source(t, gen1)); err != nil {
		t.Fatal(err)
	}
	cur1 := checkCurrent(t, host, "baseline", gen1)
	// The stored qcow2 is uncompressed: guest 64 KiB is the first data
	// cluster at 64 KiB in the file, and the clusters follow in guest order
	// within the first run of non-zero data (guest 64 KiB to 256 KiB).
	os.Chmod(cur1, 0o644)
	f, err := os.OpenFile(cur1, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{64<<10 + 100, 128<<10 + 5000} {
		if _, err := f.WriteAt([]byte("stale"), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	gen2 := gen2Of(gen1)
	st := push(t, host, gen2, Options{Cache: cache})
	t.Logf("sent %d received %d: %+v", st.Sent, st.Received, st)
	if st.CachedGens != 1 || st.IndexEntries != 0 {
		t.Errorf("got %d cached generations and %d index entries, want 1 and 0", st.CachedGens, st.IndexEntries)
	}
	// Guest blocks 16 and 33 hold the damage; gen2 has them unchanged, so
	// both are copies that fail the host's check and are re-sent.
	if st.ResentBlocks != 2 {
		t.Errorf("got %d re-sent blocks, want 2", st.ResentBlocks)
	}
	cur2 := checkCurrent(t, host, "baseline", gen2)
	raw := filepath.Join(t.TempDir(), "gen2.raw")
	if err := os.WriteFile(raw, gen2, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qimg, "compare", "-f", "raw", "-F", "qcow2", raw, cur2).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v: %s", err, out)
	}
}

// TestDamagedCacheEntry: a cache entry that does not read back costs an
// index-less push its copies, never its result, and is dropped.
func TestDamagedCacheEntry(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	cache := &Cache{Dir: t.TempDir()}
	gen1 := testImage(1, imgSize)
	push(t, host, gen1, Options{})
	s1 := source(t, gen1)
	if err := cache.Put(s1); err != nil {
		t.Fatal(err)
	}
	p := cache.path(s1.Digest)
	if err := os.Truncate(p, 100); err != nil {
		t.Fatal(err)
	}
	gen2 := gen2Of(gen1)
	st := push(t, host, gen2, Options{Cache: cache})
	checkCurrent(t, host, "baseline", gen2)
	if st.CachedGens != 0 || st.CopiedBlocks >= st.LiteralBlocks {
		t.Errorf("got %d cached generations, %d copied and %d literal blocks; want 0 cached, mostly literals", st.CachedGens, st.CopiedBlocks, st.LiteralBlocks)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("damaged entry kept: %v", err)
	}
}

func TestCacheLRU(t *testing.T) {
	cache := &Cache{Dir: filepath.Join(t.TempDir(), "a", "b"), Max: 2}
	var srcs []*Source
	for i := range 4 {
		s := source(t, testImage(int64(10+i), 128<<10))
		srcs = append(srcs, s)
		if err := cache.Put(s); err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			// Using the first entry renews it.
			if _, err := cache.Load(srcs[0].Digest); err != nil {
				t.Fatal(err)
			}
		}
	}
	got := cache.Digests(10)
	if len(got) != 2 || got[0] != srcs[3].Digest || got[1] != srcs[2].Digest {
		t.Errorf("Digests: got %x, want the last two, newest first", got)
	}
	ents, _ := os.ReadDir(cache.Dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp") {
			t.Errorf("temporary file %s left", e.Name())
		}
	}
	if len(ents) != 2 {
		t.Errorf("got %d files, want 2", len(ents))
	}
	m, err := cache.Load(srcs[3].Digest)
	if err != nil || m.Digest != srcs[3].Digest || len(m.Blocks) != 32 {
		t.Fatalf("Load: got %v, %v", m, err)
	}
	if _, err := cache.Load(srcs[0].Digest); !os.IsNotExist(err) {
		t.Errorf("Load of a dropped entry: got %v, want not exist", err)
	}
	// A file under another digest's name is refused.
	if err := os.Rename(cache.path(srcs[3].Digest), cache.path(srcs[1].Digest)); err != nil {
		t.Fatal(err)
	}
	if _, err := cache.Load(srcs[1].Digest); err == nil {
		t.Error("Load of a manifest under another digest's name succeeded")
	}
}

func TestIndexRoundTrip(t *testing.T) {
	for _, width := range []int{2, 3, 4} {
		for _, ents := range [][]indexEntry{
			{{0, 1}},
			{{0, 1}, {1, 2}, {2, 3}, {10, 4}, {11, 0xffffffff}, {1 << 20, 6}},
			{{5, 7}},
		} {
			var e enc
			gen, got, err := decodeIndex(encodeIndex(&e, 2, width, ents).b, 3, width, nil)
			if err != nil || gen != 2 || len(got) != len(ents) {
				t.Fatalf("decode: got gen %d, %v, %v; want %v", gen, got, err, ents)
			}
			for i := range ents {
				want := ents[i]
				want.Prefix &= uint32(uint64(1)<<(8*width) - 1)
				if got[i] != want {
					t.Fatalf("width %d, entry %d: got %v, want %v", width, i, got[i], want)
				}
			}
		}
		// 1000 consecutive blocks cost width bytes each and a few more.
		ents := make([]indexEntry, 1000)
		for i := range ents {
			ents[i] = indexEntry{int64(100 + i), uint32(i * 7919)}
		}
		var e enc
		if n := len(encodeIndex(&e, 1, width, ents).b); n > 1000*width+8 {
			t.Errorf("index of 1000 consecutive blocks: got %d bytes, want at most %d", n, 1000*width+8)
		}
	}
	for _, bad := range []string{
		"\x01\x01\x00\x01",                 // prefix missing
		"\x01\x02\x00\x01\x00\x01xxxxxxxx", // touching runs
		"\x01\x01\x00\x00",                 // empty run
		"\x00\x01\x00\x01xxxx",             // generation 0
		"\x04\x01\x00\x01xxxx",             // generation beyond the reply
		"\x01\x01\x00\x01xxxxy",            // trailing byte
	} {
		if _, _, err := decodeIndex([]byte(bad), 3, 4, nil); err == nil {
			t.Errorf("decodeIndex(%q) succeeded", bad)
		}
	}
	if _, _, err := decodeIndex([]byte("\x01\x01\x00\x01x"), 3, 1, nil); err == nil {
		t.Error("decodeIndex of width 1 succeeded")
	}
}

// TestCacheSharedByHosts: pushes to several hosts at once share one Cache.
func TestCacheSharedByHosts(t *testing.T) {
	gen1 := testImage(1, imgSize)
	gen2 := gen2Of(gen1)
	cache := &Cache{Dir: t.TempDir()}
	if err := cache.Put(source(t, gen1)); err != nil {
		t.Fatal(err)
	}
	src := source(t, gen2)
	hosts := make([]*store.Store, 3)
	for i := range hosts {
		hosts[i] = &store.Store{Dir: t.TempDir()}
		push(t, hosts[i], gen1, Options{})
	}
	stats := make([]*Stats, len(hosts))
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, host := range hosts {
		conn, wait := pipeSession(t, host, 0)
		wg.Add(1)
		go func() {
			defer wg.Done()
			stats[i], errs[i] = Push(context.Background(), conn, src, Options{Name: "baseline", Cache: cache})
			if err := wait(); errs[i] == nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	for i, host := range hosts {
		if errs[i] != nil {
			t.Fatalf("host %d: %v", i, errs[i])
		}
		if st := stats[i]; st.CachedGens != 1 || st.Received > 1024 || st.LiteralBlocks != 3 {
			t.Errorf("host %d: %+v; want 1 cached generation, under 1 KiB back, 3 literal blocks", i, st)
		}
		checkCurrent(t, host, "baseline", gen2)
	}
}
