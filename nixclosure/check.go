package nixclosure

import (
	"fmt"
	"sort"
)

// CheckHash compares a computed NAR hash and size (as HashPath or NarHasher
// report them) with what the closure says about the path. A path without a
// recorded hash or size accepts any. A mismatch is ErrHashMismatch.
func (p *PathInfo) CheckHash(hash string, size uint64) error {
	if p.NarHash != "" {
		want, err := NormaliseHash(p.NarHash)
		if err != nil {
			return fmt.Errorf("%s: %w", p.Path, err)
		}
		got, err := NormaliseHash(hash)
		if err != nil {
			return fmt.Errorf("%s: computed hash: %w", p.Path, err)
		}
		if got != want {
			return fmt.Errorf("%w: %s: NAR hash: got %s, want %s", ErrHashMismatch, p.Path, got, want)
		}
	}
	if p.NarSize != 0 && size != p.NarSize {
		return fmt.Errorf("%w: %s: NAR size: got %d, want %d", ErrHashMismatch, p.Path, size, p.NarSize)
	}
	return nil
}

// TopoOrder returns the paths with every path after the paths it references
// (self references aside), ties broken by path, so the order is
// deterministic: the order Nix registers paths in. It needs a valid closure.
func (c *Closure) TopoOrder() ([]*PathInfo, error) {
	index := make(map[string]int, len(c.Paths))
	for i := range c.Paths {
		index[c.Paths[i].Path] = i
	}
	pending := make([]int, len(c.Paths))     // unemitted references per path
	referrers := make([][]int, len(c.Paths)) // who references i
	for i, p := range c.Paths {
		for _, r := range p.References {
			j, ok := index[r]
			if !ok {
				return nil, fmt.Errorf("%w: %s references %s", ErrDanglingReference, p.Path, r)
			}
			if j != i {
				pending[i]++
				referrers[j] = append(referrers[j], i)
			}
		}
	}
	var ready []int
	for i := range c.Paths {
		if pending[i] == 0 {
			ready = append(ready, i)
		}
	}
	out := make([]*PathInfo, 0, len(c.Paths))
	for len(ready) > 0 {
		sort.Ints(ready) // paths are sorted, so indices order them
		i := ready[0]
		ready = ready[1:]
		out = append(out, &c.Paths[i])
		for _, k := range referrers[i] {
			if pending[k]--; pending[k] == 0 {
				ready = append(ready, k)
			}
		}
	}
	if len(out) != len(c.Paths) {
		return nil, fmt.Errorf("%w: the references form a cycle through %d paths", ErrMalformed, len(c.Paths)-len(out))
	}
	return out, nil
}
