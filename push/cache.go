package push

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"github.com/nixvm-image/nixvm-image/manifest"
)

// Cache keeps the manifests of images this machine pushed or opened, named
// by digest, so that a later push to a host holding one of them needs no
// index from the host: the sender already knows every block hash of that
// generation. A stale or damaged entry costs bytes, never correctness: the
// host checks every copied block against its own index.
//
// Entries are Dir/<digest hex>.manifest, written atomically; the newest Max
// by modification time are kept (using an entry renews it).
type Cache struct {
	Dir string
	// Max is the number of manifests kept; 0 means DefaultCacheEntries.
	Max int

	mu     sync.Mutex
	loaded map[[32]byte]*manifest.Manifest // shared by pushes to several hosts
}

// DefaultCacheEntries is how many manifests a Cache keeps by default.
const DefaultCacheEntries = 16

const cacheExt = ".manifest"

// DefaultCacheDir is $XDG_CACHE_HOME/nixvm-image/manifests (by default
// ~/.cache/nixvm-image/manifests).
func DefaultCacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, "nixvm-image", "manifests"), nil
}

func (c *Cache) path(d [32]byte) string {
	return filepath.Join(c.Dir, hex.EncodeToString(d[:])+cacheExt)
}

// Digests lists the cached digests, newest first, at most max of them.
func (c *Cache) Digests(max int) [][32]byte {
	ents, err := os.ReadDir(c.Dir)
	if err != nil {
		return nil
	}
	type ent struct {
		d [32]byte
		t time.Time
	}
	var es []ent
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), cacheExt)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		b, err := hex.DecodeString(name)
		if err != nil || len(b) != 32 {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		var x ent
		copy(x.d[:], b)
		x.t = fi.ModTime()
		es = append(es, x)
	}
	sort.SliceStable(es, func(i, j int) bool { return es[i].t.After(es[j].t) })
	var ds [][32]byte
	for i := 0; i < len(es) && i < max; i++ {
		ds = append(ds, es[i].d)
	}
	return ds
}

// Load reads the manifest of digest d and renews the entry. It fails when
// the entry is absent or damaged, or describes another digest; a damaged
// entry is removed. The manifest is read once per Cache value and shared:
// callers must not modify it.
func (c *Cache) Load(d [32]byte) (*manifest.Manifest, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m := c.loaded[d]; m != nil {
		return m, nil
	}
	p := c.path(d)
	m, err := readManifestFile(p)
	if err == nil && m.Digest != d {
		err = fmt.Errorf("push: cached manifest %s has digest %x", p, m.Digest)
	}
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = fmt.Errorf("%w (and removing the damaged entry failed: %v)", err, rerr)
			}
		}
		return nil, err
	}
	// Renewing is a hint for the LRU order: a cache on a read-only file
	// system still serves its entries.
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	if c.loaded == nil {
		c.loaded = map[[32]byte]*manifest.Manifest{}
	}
	c.loaded[d] = m
	return m, nil
}

// Put stores the manifest of src unless it is cached already (then it
// renews the entry), and drops the oldest entries beyond Max.
func (c *Cache) Put(src *Source) error {
	p := c.path(src.Digest)
	now := time.Now()
	if err := os.Chtimes(p, now, now); err == nil {
		return c.prune()
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return err
	}
	m := &manifest.Manifest{VirtualSize: src.VirtualSize, Blocks: src.Blocks, Digest: src.Digest}
	err := fsutil.WriteAtomicWith(p, 0o600, func(w io.Writer) error {
		_, err := m.WriteTo(w) // one write: no buffer needed
		return err
	})
	if err != nil {
		return err
	}
	// The kernel's file times are coarse: set the time the LRU order uses.
	now = time.Now()
	if err := os.Chtimes(p, now, now); err != nil {
		return err
	}
	return c.prune()
}

func (c *Cache) prune() error {
	max := c.Max
	if max <= 0 {
		max = DefaultCacheEntries
	}
	all := c.Digests(1 << 30)
	for _, d := range all[min(max, len(all)):] {
		c.mu.Lock()
		delete(c.loaded, d)
		c.mu.Unlock()
		if err := os.Remove(c.path(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}
