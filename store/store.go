// Package store is a host's image store: named images, each a series of
// immutable generations, one of them current. push fills it (Serve), provision
// makes guest disks from it, and GC removes the generations nothing needs.
//
// On disk, for each image name:
//
//	Dir/<name>/<digest>.qcow2           an immutable generation (mode 0444): uncompressed sparse qcow2
//	Dir/<name>/<digest>.qcow2.manifest  its block hashes (package manifest), written with the image
//	Dir/<name>/current                  symlink to the current generation, swapped atomically
//	Dir/<name>/.lock                    flock'ed by whoever changes the name (a push, gc)
//	Dir/<name>/.partial/                a generation being received, and its progress record
//
// A generation's identity is its digest (manifest.ComputeDigest of its block
// hashes); the file is named by it and never rewritten. A generation is
// complete once both files are in place: the manifest is renamed into place
// first, the image second, so a crash between the two leaves a manifest that
// List ignores. Every change to a name happens under its Lock: install
// (Lock.Put, Partial.Commit), Lock.Activate, Lock.Remove.
//
// Limits: names are 1 to MaxName bytes of [A-Za-z0-9._-]; virtual sizes are
// at most manifest.MaxVirtualSize; reading a generation's index costs 16 bytes
// per block of memory.
package store

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// DefaultDir is where a host keeps its images.
const DefaultDir = "/var/lib/nixvm-image/images"

// MaxName is the longest image name, in bytes.
const MaxName = 64

var (
	// ErrName reports an image name that is not one plain path element.
	ErrName = errors.New("store: bad image name")
	// ErrBusy reports that another process holds a name's lock.
	ErrBusy = errors.New("store: image name is locked")
	// ErrDigest reports data that does not have the expected digest or
	// block hashes.
	ErrDigest = errors.New("store: digest mismatch")
	// ErrIndex reports a damaged generation index (manifest file).
	ErrIndex = errors.New("store: bad index")
	// ErrNoCurrent reports a name without a current generation; Current
	// wraps os.ErrNotExist with it.
	ErrNoCurrent = errors.New("store: no current generation")
	// ErrNoGeneration reports a digest the name does not hold.
	ErrNoGeneration = errors.New("store: no such generation")
	// ErrSize reports a virtual size a generation cannot have.
	ErrSize = errors.New("store: bad virtual size")
	// ErrConflict reports a digest the store holds with another virtual
	// size (a digest does not cover the size).
	ErrConflict = errors.New("store: digest held with another size")
	// ErrLink reports a compatibility link that could not be made.
	ErrLink = errors.New("store: cannot make the link")
)

// Store is a host's image store rooted at Dir.
type Store struct {
	Dir string // "" means DefaultDir
}

// Generation is one immutable image a store holds.
type Generation struct {
	Name        string
	Digest      [32]byte
	VirtualSize int64
	Current     bool
	Path        string // the image file (never the current symlink)
}

func (s *Store) dir() string {
	if s.Dir == "" {
		return DefaultDir
	}
	return s.Dir
}

// nameDir is the directory of name's generations.
func (s *Store) nameDir(name string) string { return filepath.Join(s.dir(), name) }

// ValidName checks an image name: 1 to MaxName bytes of [A-Za-z0-9._-], not
// starting with a dot, so it is one path element and never a hidden file.
func ValidName(name string) error {
	if name == "" || len(name) > MaxName {
		return fmt.Errorf("%w: image name %q must be 1 to %d characters", ErrName, name, MaxName)
	}
	if name[0] == '.' {
		return fmt.Errorf("%w: image name %q must not start with a dot", ErrName, name)
	}
	for _, c := range []byte(name) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("%w: image name %q may hold only letters, digits, '.', '_' and '-'", ErrName, name)
		}
	}
	return nil
}

func digestHex(d [32]byte) string { return hex.EncodeToString(d[:]) }

// genFile is the file name of generation d.
func genFile(d [32]byte) string { return digestHex(d) + ".qcow2" }

const manifestExt = ".manifest"

// parseGenFile returns the digest a generation's file name carries.
func parseGenFile(name string) ([32]byte, bool) {
	var d [32]byte
	hexd, ok := strings.CutSuffix(name, ".qcow2")
	if !ok || len(hexd) != 64 || strings.ToLower(hexd) != hexd {
		return d, false
	}
	if _, err := hex.Decode(d[:], []byte(hexd)); err != nil {
		return d, false
	}
	return d, true
}

// Names lists the image names in the store.
func (s *Store) Names() ([]string, error) {
	ents, err := os.ReadDir(s.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		if e.IsDir() && ValidName(e.Name()) == nil {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// List returns the complete generations of name (each with a valid index),
// the current one first, then newest first.
func (s *Store) List(name string) ([]Generation, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	dir := s.nameDir(name)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	cur, _ := os.Readlink(filepath.Join(dir, "current")) // none yet: no current
	type dated struct {
		g     Generation
		mtime int64
	}
	var gens []dated
	for _, e := range ents {
		g, fi, ok := completeGen(dir, e.Name())
		if !ok {
			continue
		}
		g.Name, g.Current = name, cur == e.Name()
		gens = append(gens, dated{g, fi.ModTime().UnixNano()})
	}
	sort.SliceStable(gens, func(i, j int) bool {
		if gens[i].g.Current != gens[j].g.Current {
			return gens[i].g.Current
		}
		return gens[i].mtime > gens[j].mtime
	})
	out := make([]Generation, len(gens))
	for i := range gens {
		out[i] = gens[i].g
	}
	return out, nil
}

// completeGen returns the generation that file names in dir when it is a
// regular file with a readable index; anything else (an interrupted
// install, a stray file) is never offered.
func completeGen(dir, file string) (Generation, os.FileInfo, bool) {
	d, ok := parseGenFile(file)
	if !ok {
		return Generation{}, nil, false
	}
	p := filepath.Join(dir, file)
	fi, err := os.Lstat(p)
	if err != nil || !fi.Mode().IsRegular() {
		return Generation{}, nil, false
	}
	m, err := readIndex(p + manifestExt)
	if err != nil || m.Digest != d {
		return Generation{}, nil, false
	}
	return Generation{Digest: d, VirtualSize: m.VirtualSize, Path: p}, fi, true
}

// Current returns name's current generation: the one its current symlink
// names, with the immutable path (not the symlink) in Path. It fails with
// ErrNoCurrent (which wraps os.ErrNotExist) when the store has no complete
// current generation of name.
func (s *Store) Current(name string) (Generation, error) {
	gens, err := s.List(name)
	if err != nil {
		return Generation{}, err
	}
	if len(gens) == 0 || !gens[0].Current {
		return Generation{}, fmt.Errorf("%w of %q in %s: %w", ErrNoCurrent, name, s.nameDir(name), os.ErrNotExist)
	}
	return gens[0], nil
}

// Manifest reads generation g's index: its block hashes, checked against
// its digest.
func (s *Store) Manifest(g Generation) (*manifest.Manifest, error) {
	m, err := readIndex(g.Path + manifestExt)
	if err != nil {
		return nil, err
	}
	if m.Digest != g.Digest {
		return nil, fmt.Errorf("%w: index of %s has digest %x", ErrIndex, g.Path, m.Digest)
	}
	return m, nil
}

// readIndex reads and validates a generation's index file.
func readIndex(path string) (*manifest.Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return decodeIndex(bufio.NewReaderSize(f, 1<<20))
}

func decodeIndex(r io.Reader) (*manifest.Manifest, error) {
	m, err := manifest.Read(r)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrIndex, err)
	}
	if m.VirtualSize <= 0 || m.VirtualSize > manifest.MaxVirtualSize {
		return nil, fmt.Errorf("%w: virtual size %d out of range", ErrIndex, m.VirtualSize)
	}
	return m, nil
}
