package nixclosure

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Sentinel errors, tested with errors.Is.
var (
	ErrMalformed         = errors.New("nixclosure: malformed input")
	ErrDanglingReference = errors.New("nixclosure: reference to a path outside the closure")
	ErrDuplicate         = errors.New("nixclosure: duplicate store path")
	ErrNotInStore        = errors.New("nixclosure: not a store path")
	ErrHashMismatch      = errors.New("nixclosure: hash mismatch")
)

// DefaultStoreDir is the Nix store directory.
const DefaultStoreDir = "/nix/store"

// PathInfo is what Nix knows about one valid store path.
type PathInfo struct {
	Path       string   // /nix/store/<hash>-<name>
	NarHash    string   // "" when the input has none; else "sha256:<nix32>"
	NarSize    uint64   // 0 when unknown
	Deriver    string   // "" when unknown
	References []string // sorted, may include Path itself
}

// Closure is a set of store paths closed under references.
type Closure struct {
	StoreDir string     // "/nix/store"
	Paths    []PathInfo // sorted by Path
}

// storeDir returns c.StoreDir or the default.
func (c *Closure) storeDir() string {
	if c.StoreDir == "" {
		return DefaultStoreDir
	}
	return c.StoreDir
}

// Lookup returns the PathInfo of path, or nil.
func (c *Closure) Lookup(path string) *PathInfo {
	i := sort.Search(len(c.Paths), func(i int) bool { return c.Paths[i].Path >= path })
	if i < len(c.Paths) && c.Paths[i].Path == path {
		return &c.Paths[i]
	}
	return nil
}

// HasHashes reports whether every path has a NAR hash.
func (c *Closure) HasHashes() bool {
	for _, p := range c.Paths {
		if p.NarHash == "" {
			return false
		}
	}
	return true
}

// Sort sorts the paths by path and each reference list, the order Validate
// wants. The parsers return closures already sorted.
func (c *Closure) Sort() {
	sort.Slice(c.Paths, func(i, j int) bool { return c.Paths[i].Path < c.Paths[j].Path })
	for i := range c.Paths {
		sort.Strings(c.Paths[i].References)
	}
}

// Validate checks that the closure is well formed: every path is a valid
// store path under StoreDir, paths are sorted and unique, every reference is
// in the closure, reference lists are sorted and unique, hashes (when given)
// are sha256:<nix32> and derivers (when given) are store paths.
func (c *Closure) Validate() error {
	dir := c.storeDir()
	for i := range c.Paths {
		p := &c.Paths[i]
		if err := CheckStorePath(dir, p.Path); err != nil {
			return err
		}
		if i > 0 {
			prev := c.Paths[i-1].Path
			if prev == p.Path {
				return fmt.Errorf("%w: %s", ErrDuplicate, p.Path)
			}
			if prev > p.Path {
				return fmt.Errorf("%w: paths not sorted: %s before %s", ErrMalformed, prev, p.Path)
			}
		}
		if p.NarHash != "" {
			n, err := NormaliseHash(p.NarHash)
			if err != nil {
				return fmt.Errorf("%s: %w", p.Path, err)
			}
			if n != p.NarHash {
				return fmt.Errorf("%w: %s: hash %q is not in the form sha256:<nix32> (%s)", ErrMalformed, p.Path, p.NarHash, n)
			}
		}
		if p.Deriver != "" {
			if err := CheckStorePath(dir, p.Deriver); err != nil {
				return fmt.Errorf("%s: deriver: %w", p.Path, err)
			}
		}
	}
	for i := range c.Paths {
		p := &c.Paths[i]
		for j, r := range p.References {
			if j > 0 && p.References[j-1] >= r {
				if p.References[j-1] == r {
					return fmt.Errorf("%w: %s lists reference %s twice", ErrDuplicate, p.Path, r)
				}
				return fmt.Errorf("%w: %s: references not sorted: %s before %s", ErrMalformed, p.Path, p.References[j-1], r)
			}
			if c.Lookup(r) == nil {
				if err := CheckStorePath(dir, r); err != nil {
					return fmt.Errorf("%s: reference: %w", p.Path, err)
				}
				return fmt.Errorf("%w: %s references %s", ErrDanglingReference, p.Path, r)
			}
		}
	}
	return nil
}

// maxNameLen is Nix's limit on the name part of a store path.
const maxNameLen = 211

// CheckStorePath checks that p is storeDir/<32 nix32 chars>-<name> with a
// name Nix accepts (non-empty, at most 211 characters of [A-Za-z0-9+-._?=],
// not starting with a dot).
func CheckStorePath(storeDir, p string) error {
	base, ok := strings.CutPrefix(p, storeDir+"/")
	if !ok {
		return fmt.Errorf("%w: %q is not under %s", ErrNotInStore, p, storeDir)
	}
	if err := checkBaseName(base); err != nil {
		return fmt.Errorf("%w: %q: %v", ErrNotInStore, p, err)
	}
	return nil
}

func checkBaseName(base string) error {
	if len(base) < 34 || base[32] != '-' {
		return errors.New("want <32 nix32 characters>-<name>")
	}
	for i := 0; i < 32; i++ {
		if nix32Index[base[i]] < 0 {
			return fmt.Errorf("invalid character %q in the hash part", base[i])
		}
	}
	name := base[33:]
	if len(name) > maxNameLen {
		return fmt.Errorf("name is %d characters long, want at most %d", len(name), maxNameLen)
	}
	if name[0] == '.' {
		return errors.New("name starts with a dot")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("+-._?=", c) >= 0:
		default:
			return fmt.Errorf("invalid character %q in the name", c)
		}
	}
	return nil
}
