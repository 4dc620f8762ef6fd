package publish

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// HostStore adapts the host image store (package store, the one push fills)
// to Store. Install and Activate run under the lock that Lock took.
type HostStore struct {
	S *store.Store

	mu    sync.Mutex
	locks map[string]*store.Lock
}

// NewHostStore returns the adapter for the store in dir ("" for the default).
func NewHostStore(dir string) *HostStore { return &HostStore{S: &store.Store{Dir: dir}} }

func (h *HostStore) Generations(name string) ([]LocalGeneration, error) {
	gens, err := h.S.List(name)
	if err != nil {
		return nil, err
	}
	out := make([]LocalGeneration, len(gens))
	for i, g := range gens {
		out[i] = LocalGeneration{
			Digest:   g.Digest,
			Current:  g.Current,
			Manifest: func() (*manifest.Manifest, error) { return h.S.Manifest(g) },
			Open: func() (BlockReader, error) {
				r, err := g.Open()
				if err != nil {
					return nil, err
				}
				return r, nil
			},
		}
	}
	return out, nil
}

func (h *HostStore) Lock(name string) (func(), error) {
	l, err := h.S.Lock(name)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	if h.locks == nil {
		h.locks = map[string]*store.Lock{}
	}
	h.locks[name] = l
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		delete(h.locks, name)
		h.mu.Unlock()
		l.Unlock()
	}, nil
}

// held returns the lock Lock took for name.
func (h *HostStore) held(name string) (*store.Lock, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if l := h.locks[name]; l != nil {
		return l, nil
	}
	return nil, fmt.Errorf("publish: %s: the store's lock is not held (BUG)", name)
}

// ScratchDir is NAME/.pull in the store: on its file system, kept across runs.
func (h *HostStore) ScratchDir(name string) (string, error) {
	if err := store.ValidName(name); err != nil {
		return "", err
	}
	dir := h.S.Dir
	if dir == "" {
		dir = store.DefaultDir
	}
	d := filepath.Join(dir, name, ".pull")
	return d, os.MkdirAll(d, 0o700)
}

// Install has the store check every block of content against m and write
// the generation, then points current (and link) at it.
func (h *HostStore) Install(name string, m *manifest.Manifest, content io.ReaderAt, link string) error {
	l, err := h.held(name)
	if err != nil {
		return err
	}
	if _, err := l.Put(content, m); err != nil {
		if errors.Is(err, store.ErrDigest) || errors.Is(err, store.ErrIndex) {
			return fmt.Errorf("%w: %v", ErrVerify, err)
		}
		return err
	}
	return l.Activate(m.Digest, link)
}

func (h *HostStore) Activate(name string, digest [32]byte, link string) error {
	l, err := h.held(name)
	if err != nil {
		return err
	}
	return l.Activate(digest, link)
}
