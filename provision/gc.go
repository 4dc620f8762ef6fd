package provision

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/nixvm-image/nixvm-image/push"
)

// GCOptions say which generations GC may remove and where to look for the
// disks that use them.
type GCOptions struct {
	Store *push.Store
	// Names limits GC to these image names; empty means every name.
	Names []string
	// Keep is how many of each name's generations to keep, newest first,
	// counting the current one (which is kept even with Keep 0).
	Keep int
	// ScanDirs are searched recursively for qcow2 files whose backing chain
	// reaches a generation, and for symlinks to one (the compatibility link).
	ScanDirs []string
	// Pools are libvirt pools whose volumes are checked the same way.
	Pools []string
	// Domains also checks every disk of every libvirt domain.
	Domains bool
	// Virsh is needed for Pools and Domains.
	Virsh *Virsh
	// DryRun decides but removes nothing.
	DryRun bool
}

// Decision is what GC did (or, with DryRun, would do) to one generation.
type Decision struct {
	Gen    push.Generation
	Remove bool
	Reason string   // why it is kept: "current", "newest N", "referenced"
	Users  []string // the disks or links that reference it
}

// maxChain bounds how far GC follows backing files (loops, deep chains).
const maxChain = 32

// GC removes each name's generations beyond the newest Keep, except the
// current one and any that a disk it finds uses (directly, through a backing
// chain, or through a symlink). It takes each name's store lock, so it never
// runs beside a push to that name.
func GC(ctx context.Context, o GCOptions) ([]Decision, error) {
	if o.Store == nil {
		return nil, errors.New("provision: GC without a store")
	}
	if o.Keep < 0 {
		return nil, fmt.Errorf("provision: keep %d: want 0 or more", o.Keep)
	}
	users, err := findUsers(ctx, o)
	if err != nil {
		return nil, err
	}
	names := o.Names
	if len(names) == 0 {
		if names, err = o.Store.Names(); err != nil {
			return nil, err
		}
	}
	var out []Decision
	for _, name := range names {
		ds, err := gcName(o, name, users)
		out = append(out, ds...)
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

func gcName(o GCOptions, name string, users map[string][]string) ([]Decision, error) {
	unlock, err := o.Store.Lock(name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	gens, err := o.Store.List(name) // under the lock: current is up to date
	if err != nil {
		return nil, err
	}
	var out []Decision
	for i, g := range gens {
		d := Decision{Gen: g, Users: users[canonical(g.Path)]}
		switch {
		case g.Current:
			d.Reason = "current"
		case i < o.Keep:
			d.Reason = fmt.Sprintf("newest %d", o.Keep)
		case len(d.Users) > 0:
			d.Reason = "referenced"
		default:
			d.Remove = true
		}
		if d.Remove && !o.DryRun {
			for _, p := range []string{g.Path, g.Path + ".manifest"} {
				if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
					return append(out, d), fmt.Errorf("provision: removing generation %s: %w", p, err)
				}
			}
		}
		out = append(out, d)
	}
	if !o.DryRun && len(gens) > 0 {
		if err := syncDir(filepath.Dir(gens[0].Path)); err != nil {
			return out, err
		}
	}
	return out, nil
}

// findUsers maps each file reachable from the scanned disks (canonical
// path) to the disks that reach it.
func findUsers(ctx context.Context, o GCOptions) (map[string][]string, error) {
	users := map[string][]string{}
	add := func(disk string) {
		for _, p := range chain(disk) {
			users[p] = append(users[p], disk)
		}
	}
	for _, dir := range o.ScanDirs {
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
			return nil, fmt.Errorf("provision: scanning %s: %w", dir, err)
		}
	}
	if (len(o.Pools) > 0 || o.Domains) && o.Virsh == nil {
		return nil, errors.New("provision: scanning pools and domains needs virsh")
	}
	for _, pool := range o.Pools {
		paths, err := o.Virsh.PoolPaths(ctx, pool)
		if err != nil {
			return nil, fmt.Errorf("provision: listing pool %s: %w", pool, err)
		}
		for _, p := range paths {
			add(p)
		}
	}
	if o.Domains {
		doms, err := o.Virsh.Domains(ctx, true)
		if err != nil {
			return nil, fmt.Errorf("provision: listing domains: %w", err)
		}
		for _, d := range doms {
			disks, err := o.Virsh.DomainDisks(ctx, d)
			if err != nil {
				return nil, fmt.Errorf("provision: listing disks of domain %s: %w", d, err)
			}
			for _, p := range disks {
				add(p)
			}
		}
	}
	for k := range users {
		sort.Strings(users[k])
	}
	return users, nil
}

// chain returns what disk uses: the file a symlink resolves to, and every
// backing file along its qcow2 chain (canonical paths), not disk itself
// unless it is reached through a link.
func chain(disk string) []string {
	var out []string
	seen := map[string]bool{}
	cur := canonical(disk)
	if cur != filepath.Clean(disk) {
		out = append(out, cur)
	}
	seen[cur] = true
	for range maxChain {
		f, err := os.Open(cur)
		if err != nil {
			return out
		}
		name, err := BackingFile(f)
		f.Close()
		if err != nil || name == "" {
			return out
		}
		if !filepath.IsAbs(name) {
			name = filepath.Join(filepath.Dir(cur), name)
		}
		next := canonical(name)
		if seen[next] {
			return out
		}
		seen[next] = true
		out = append(out, next)
		cur = next
	}
	return out
}
