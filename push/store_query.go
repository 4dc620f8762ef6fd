package push

import (
	"fmt"
	"os"
	"path/filepath"
)

// Lock takes name's store lock without waiting, as a push does, and returns
// the function that releases it. While it is held no push to name runs, so
// the caller may remove generations (nixvm-image gc) without racing one that
// copies blocks from them. It fails with ErrBusy while a push holds it.
func (s *Store) Lock(name string) (unlock func(), err error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	return s.lock(name)
}

// Current returns name's current generation: the one its current symlink
// names, with the immutable path (not the symlink) in Path. It fails with an
// error wrapping os.ErrNotExist when the store has no complete generation of
// name.
func (s *Store) Current(name string) (Generation, error) {
	gens, err := s.List(name)
	if err != nil {
		return Generation{}, err
	}
	if len(gens) == 0 || !gens[0].Current {
		return Generation{}, fmt.Errorf("push: no current generation of %q in %s: %w (push one first: nixvm-image push HOST --name %s)", name, filepath.Join(s.dir(), name), os.ErrNotExist, name)
	}
	return gens[0], nil
}
