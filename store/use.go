package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// useLockFile is flock'ed shared by each Use of a name and exclusively by
// GC, so GC never removes a generation between a provision resolving
// current and the disk that uses it being in place.
const useLockFile = ".use.lock"

// useRetry is how often Use tries again while GC holds the name.
const useRetry = 50 * time.Millisecond

// Use keeps GC from removing any generation of one name while a disk is
// made from one. Pushes go on beside it: they add generations and move
// current, and never remove one.
type Use struct {
	s    *Store
	name string
	f    *os.File
}

// Use waits until no GC runs on name (GC holds a name for the time of a
// directory scan) and returns the Use, or fails when ctx ends. A name the
// store does not have fails with ErrNoCurrent, like Current.
func (s *Store) Use(ctx context.Context, name string) (*Use, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	dir := s.nameDir(name)
	f, err := os.OpenFile(filepath.Join(dir, useLockFile), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w of %q in %s: %w", ErrNoCurrent, name, dir, os.ErrNotExist)
	}
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			return &Use{s: s, name: name, f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errors.Join(fmt.Errorf("store: locking %s: %w", f.Name(), err), f.Close())
		}
		select {
		case <-ctx.Done():
			return nil, errors.Join(fmt.Errorf("%w: gc is running on %q: %w", ErrBusy, name, ctx.Err()), f.Close())
		case <-time.After(useRetry):
		}
	}
}

// Current returns the name's current generation (Store.Current); it stays
// on disk until the Use is released.
func (u *Use) Current() (Generation, error) { return u.s.Current(u.name) }

// Release ends the Use. Later calls do nothing.
func (u *Use) Release() error {
	if u.f == nil {
		return nil
	}
	err := u.f.Close()
	u.f = nil
	return err
}

// excludeUses takes the name's use lock exclusively, without waiting: it
// fails with ErrBusy while a Use holds it. Unlock releases it.
func (l *Lock) excludeUses() error {
	p := filepath.Join(l.dir, useLockFile)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			err = fmt.Errorf("%w: a disk is being made from a generation of %q (it holds %s)", ErrBusy, l.name, p)
		} else {
			err = fmt.Errorf("store: locking %s: %w", p, err)
		}
		return errors.Join(err, f.Close())
	}
	l.use = f
	return nil
}
