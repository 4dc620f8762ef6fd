package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

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
	if err := l.s.replaceableLink(link); err != nil {
		return err
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

// replaceableLink checks that the compatibility link may be put at path:
// nothing is there, or a symlink into the store, or a dangling one. Anything
// else (a guest's disk file, a directory, a link elsewhere) is refused by
// name and left as it is.
func (s *Store) replaceableLink(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w %s: %w", ErrLink, path, err)
	}
	if fi.Mode()&os.ModeSymlink == 0 {
		return fmt.Errorf("%w %s: it is a %s, not a symlink; only a symlink into the store (or a dangling one) is replaced: move it away or give another --link", ErrLink, path, kind(fi.Mode()))
	}
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil // dangling
	}
	root, err := filepath.EvalSymlinks(s.dir())
	if err != nil {
		root = filepath.Clean(s.dir())
	}
	if rel, err := filepath.Rel(root, target); err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") {
		return nil
	}
	return fmt.Errorf("%w %s: it is a symlink to %s, outside the store %s; only a symlink into the store (or a dangling one) is replaced: remove it or give another --link", ErrLink, path, target, root)
}

// kind names a file type for messages.
func kind(m os.FileMode) string {
	switch {
	case m.IsRegular():
		return "regular file"
	case m.IsDir():
		return "directory"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeDevice != 0:
		return "block device"
	case m&os.ModeNamedPipe != 0:
		return "FIFO"
	case m&os.ModeSocket != 0:
		return "socket"
	}
	return "special file"
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
