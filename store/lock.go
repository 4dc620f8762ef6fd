package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"golang.org/x/sys/unix"
)

// Lock is the exclusive right to change one image name: install, activate
// and remove its generations. It is an flock on Dir/<name>/.lock, so it is
// released when the process dies.
type Lock struct {
	s    *Store
	name string
	dir  string
	f    *os.File
	use  *os.File // the use lock, while GC excludes Uses
}

// Lock takes name's lock without waiting. It fails with ErrBusy while
// another process (a push, gc) holds it.
func (s *Store) Lock(name string) (*Lock, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	dir := s.nameDir(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	p := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: another push to %q is in progress on this host (it holds %s); try again when it has finished", ErrBusy, name, p)
		}
		return nil, fmt.Errorf("store: locking %s: %w", p, err)
	}
	return &Lock{s: s, name: name, dir: dir, f: f}, nil
}

// Unlock releases the lock. Later calls do nothing.
func (l *Lock) Unlock() error {
	var err error
	if l.use != nil {
		err = l.use.Close()
		l.use = nil
	}
	if l.f != nil {
		err = errors.Join(err, l.f.Close())
		l.f = nil
	}
	return err
}

// Name is the image name the lock holds.
func (l *Lock) Name() string { return l.name }

// Activate points name's current symlink at generation digest, and link
// (an absolute path, if not "") at the generation's file: the
// compatibility link, such as /etc/virt/base-images/baseline.qcow2. Each
// symlink is swapped atomically.
func (l *Lock) Activate(digest [32]byte, link string) error {
	file := genFile(digest)
	path := filepath.Join(l.dir, file)
	if _, ok := l.s.generation(l.name, digest); !ok {
		return fmt.Errorf("%w: %s is not a complete generation of %q", ErrNoGeneration, path, l.name)
	}
	if err := replaceSymlink(file, filepath.Join(l.dir, "current")); err != nil {
		return err
	}
	if link == "" {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		return fmt.Errorf("%w %s: %w", ErrLink, link, err)
	}
	if err := replaceSymlink(abs, link); err != nil {
		return fmt.Errorf("%w %s: %w", ErrLink, link, err)
	}
	return nil
}

// generation returns name's complete generation digest, if the store holds it.
func (s *Store) generation(name string, digest [32]byte) (Generation, bool) {
	g, _, ok := completeGen(s.nameDir(name), genFile(digest))
	g.Name = name
	return g, ok
}

// Remove deletes generation g of the locked name: its image, then its
// index. It does not check whether anything uses g (GC does).
func (l *Lock) Remove(g Generation) error {
	if g.Name != l.name || filepath.Dir(g.Path) != l.dir {
		return fmt.Errorf("BUG: store: removing %s under the lock of %q", g.Path, l.name)
	}
	for _, p := range []string{g.Path, g.Path + manifestExt} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("store: removing generation %s: %w", p, err)
		}
	}
	return fsutil.SyncDir(l.dir)
}

// replaceSymlink atomically makes path a symlink to target.
func replaceSymlink(target, path string) error {
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return errors.Join(err, os.Remove(tmp))
	}
	return fsutil.SyncDir(filepath.Dir(path))
}
