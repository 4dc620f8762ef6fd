package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"golang.org/x/sys/unix"
)

// GCOptions say which generations GC may remove and where to look for the
// disks that use them.
type GCOptions struct {
	// Names limits GC to these image names; empty means every name.
	Names []string
	// Keep is how many of each name's generations to keep, newest first,
	// counting the current one (which is kept even with Keep 0).
	Keep int
	// ScanDirs are searched recursively for qcow2 files whose backing chain
	// reaches a generation, and for symlinks to one (the compatibility link).
	ScanDirs []string
	// Disks, if set, lists more disks to check the same way, such as the
	// volumes of libvirt pools and the disks of libvirt domains. A disk
	// whose Format is "raw" is never read as a qcow2 (a guest owns its
	// sector 0), wherever GC finds it.
	Disks func(ctx context.Context) ([]Disk, error)
	// PartialAge is how long a partial receive no push touched is kept for
	// a push to resume; 0 means DefaultPartialAge.
	PartialAge time.Duration
	// DryRun decides but removes nothing.
	DryRun bool
}

// Disk is a disk GC checks: its path, and its format when known ("raw",
// "qcow2"; "" for unknown).
type Disk struct {
	Path   string
	Format string
}

// Decision is what GC did (or, with DryRun, would do) to one generation.
type Decision struct {
	Gen    Generation
	Remove bool
	Reason string   // why it is kept: "current", "newest N", "referenced"
	Users  []string // the disks or links that reference it
}

// GCReport is what GC did (or, with DryRun, would do).
type GCReport struct {
	Decisions []Decision // one per generation of the names it went through
	Junk      []Junk     // leftovers removed (with DryRun: to remove)
	Skipped   []Skip     // names left alone because they were busy
}

// Skip is a name GC left alone: a push held its lock, or a disk was being
// made from one of its generations.
type Skip struct {
	Name string
	Err  error // wraps ErrBusy
}

// Junk is a leftover GC removes: a stale partial receive, an index whose
// image is gone, an unused image without an index, a temporary file.
type Junk struct {
	Path  string
	Why   string
	Bytes int64 // disk space it takes
}

// maxChain bounds how far GC follows backing files (loops, deep chains).
const maxChain = 32

// GC removes each name's generations beyond the newest Keep, except the
// current one and any that a disk it finds uses (directly, through a backing
// chain, or through a symlink), and the name's leftovers. It first takes the
// lock of every name (so no push runs beside it) and excludes every Use (so
// no disk is being made from a generation), then scans for disks, then
// removes. A name that is busy is skipped and reported in the result; the
// others are collected.
func (s *Store) GC(ctx context.Context, o GCOptions) (_ *GCReport, err error) {
	rep := &GCReport{}
	if o.Keep < 0 {
		return rep, fmt.Errorf("store: keep %d: want 0 or more", o.Keep)
	}
	names := o.Names
	if len(names) == 0 {
		if names, err = s.Names(); err != nil {
			return rep, err
		}
	}
	locks, err := s.lockForGC(names, rep)
	defer func() {
		for _, l := range locks {
			err = errors.Join(err, l.Unlock())
		}
	}()
	if err != nil {
		return rep, err
	}
	users, err := s.findUsers(ctx, o) // under the locks: no disk appears unseen
	if err != nil {
		return rep, err
	}
	for _, l := range locks {
		if err := s.gcName(o, l, users, rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// lockForGC takes the lock of each name and excludes its Uses; busy names
// go to rep.Skipped.
func (s *Store) lockForGC(names []string, rep *GCReport) ([]*Lock, error) {
	var locks []*Lock
	for _, name := range names {
		l, err := s.Lock(name)
		if err == nil {
			if err = l.excludeUses(); err != nil {
				err = errors.Join(err, l.Unlock())
			}
		}
		switch {
		case err == nil:
			locks = append(locks, l)
		case errors.Is(err, ErrBusy):
			rep.Skipped = append(rep.Skipped, Skip{Name: name, Err: err})
		default:
			return locks, err
		}
	}
	return locks, nil
}

// gcName removes the locked name's generations that the keep rules and
// users allow, and its leftovers, and adds what it did to rep.
func (s *Store) gcName(o GCOptions, l *Lock, users map[string][]string, rep *GCReport) error {
	gens, err := s.List(l.name) // under the lock: current is up to date
	if err != nil {
		return err
	}
	for i, g := range gens {
		d := decide(g, i, o.Keep, users[canonical(g.Path)])
		rep.Decisions = append(rep.Decisions, d)
		if d.Remove && !o.DryRun {
			if err := l.Remove(g); err != nil {
				return err
			}
		}
	}
	junk, err := l.leftovers(o, users, time.Now())
	if err != nil {
		return err
	}
	rep.Junk = append(rep.Junk, junk...)
	if o.DryRun || len(junk) == 0 {
		return nil
	}
	if err := l.removeJunk(junk); err != nil {
		return err
	}
	return fsutil.SyncDir(l.dir)
}

// decide applies the keep rules to generation g, the i-th of its name
// (current first, then newest first).
func decide(g Generation, i, keep int, users []string) Decision {
	d := Decision{Gen: g, Users: users}
	switch {
	case g.Current:
		d.Reason = "current"
	case i < keep:
		d.Reason = fmt.Sprintf("newest %d", keep)
	case len(users) > 0:
		d.Reason = "referenced"
	default:
		d.Remove = true
	}
	return d
}

// findUsers maps each file reachable from the scanned disks (canonical
// path) to the disks that reach it. Disks listed as raw are never parsed,
// and a backing file is followed only when it is a regular file inside the
// store or a scanned directory (a guest can forge a raw disk's header; see
// chainOf).
func (s *Store) findUsers(ctx context.Context, o GCOptions) (map[string][]string, error) {
	var listed []Disk
	if o.Disks != nil {
		var err error
		if listed, err = o.Disks(ctx); err != nil {
			return nil, err
		}
	}
	w := walker{raw: map[string]bool{}, roots: []string{canonical(s.dir())}}
	for _, dir := range o.ScanDirs {
		w.roots = append(w.roots, canonical(dir))
	}
	for _, d := range listed {
		if d.Format == "raw" {
			w.raw[canonical(d.Path)] = true
		}
	}
	users := map[string][]string{}
	add := func(disk string) {
		for _, p := range w.chain(disk) {
			users[p] = append(users[p], disk)
		}
	}
	for _, dir := range o.ScanDirs {
		if err := scanDir(dir, add); err != nil {
			return nil, err
		}
	}
	for _, d := range listed {
		add(d.Path)
	}
	for k := range users {
		sort.Strings(users[k])
	}
	return users, nil
}

// scanDir calls add for every file, device and symlink below dir.
func scanDir(dir string, add func(string)) error {
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == dir {
				return err
			}
			return nil // unreadable entries below: not ours to judge
		}
		if d.IsDir() && d.Name() == ".partial" {
			return filepath.SkipDir
		}
		if d.Type()&fs.ModeSymlink != 0 || d.Type().IsRegular() || d.Type()&fs.ModeDevice != 0 {
			add(p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: scanning %s: %w", dir, err)
	}
	return nil
}

// walker follows backing chains: raw holds the canonical paths of disks
// known to be raw, roots the directories a backing file may be in.
type walker struct {
	raw   map[string]bool
	roots []string
}

// chain returns what disk uses: the file a symlink resolves to, and every
// backing file along its qcow2 chain (canonical paths), not disk itself
// unless it is reached through a link. A raw disk has no chain. A backing
// file outside the roots, or not a regular file, ends the chain unopened.
func (w *walker) chain(disk string) []string {
	var out []string
	seen := map[string]bool{}
	cur := canonical(disk)
	if cur != filepath.Clean(disk) {
		out = append(out, cur)
	}
	seen[cur] = true
	for range maxChain {
		if w.raw[cur] {
			return out
		}
		next, ok := backingOf(cur)
		if !ok || seen[next] || !w.inRoots(next) {
			return out
		}
		if fi, err := os.Lstat(next); err != nil || !fi.Mode().IsRegular() {
			return out
		}
		seen[next] = true
		out = append(out, next)
		cur = next
	}
	return out
}

// inRoots reports whether canonical path p is below one of the roots.
func (w *walker) inRoots(p string) bool {
	for _, r := range w.roots {
		if rel, err := filepath.Rel(r, p); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && rel != "." {
			return true
		}
	}
	return false
}

// backingOf returns the canonical path of the backing file of the qcow2
// at path, if it has one. It opens path without following a last symlink
// and without blocking (a FIFO or a device with side effects on read must
// not stall or trigger anything), and reads only a regular file or a block
// device (an LV holding a qcow2).
func backingOf(path string) (string, bool) {
	if !readable(path) { // opening some devices has effects (a watchdog)
		return "", false
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return "", false
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !diskType(fi.Mode()) {
		return "", false
	}
	name, err := BackingFile(f)
	if err != nil || name == "" {
		return "", false
	}
	if !filepath.IsAbs(name) {
		name = filepath.Join(filepath.Dir(path), name)
	}
	return canonical(name), true
}

// readable reports whether path (not following a last symlink) is a file
// or block device, the only kinds of disk GC opens.
func readable(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && diskType(fi.Mode())
}

func diskType(m fs.FileMode) bool {
	return m.IsRegular() || m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0
}

// canonical resolves symlinks where it can (so /dev/VG/LV matches /dev/dm-3).
func canonical(p string) string {
	if r, err := filepath.EvalSymlinks(p); err == nil {
		return r
	}
	return filepath.Clean(p)
}
