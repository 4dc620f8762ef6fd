package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// DefaultPartialAge is how long GC keeps a partial receive that no push has
// touched, for a push to resume.
const DefaultPartialAge = 24 * time.Hour

// leftovers lists what crashes and abandoned receives left in the locked
// name's directory. users are the files disks use (canonical paths): an
// image without an index that a disk uses is not junk.
func (l *Lock) leftovers(o GCOptions, users map[string][]string, now time.Time) ([]Junk, error) {
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, err
	}
	var junk []Junk
	for _, e := range ents {
		p := filepath.Join(l.dir, e.Name())
		switch why := l.junkWhy(e.Name(), users); {
		case e.Name() == ".partial" && e.IsDir():
			pj, err := l.stalePartials(p, o.partialAge(), now)
			if err != nil {
				return nil, err
			}
			junk = append(junk, pj...)
		case why != "":
			junk = append(junk, Junk{Path: p, Why: why, Bytes: diskBytes(p)})
		}
	}
	return junk, nil
}

// junkWhy says why the entry name of the name's directory is junk, or "".
func (l *Lock) junkWhy(name string, users map[string][]string) string {
	switch {
	case name == ".lock" || name == useLockFile || name == "current" || name == ".partial":
		return ""
	case strings.HasPrefix(name, ".") && strings.Contains(name, ".tmp-"):
		return "temporary file of an interrupted install or swap"
	}
	if img, ok := strings.CutSuffix(name, manifestExt); ok {
		if _, isGen := parseGenFile(img); isGen {
			if _, err := os.Lstat(filepath.Join(l.dir, img)); errors.Is(err, os.ErrNotExist) {
				return "index whose image is gone"
			}
		}
		return ""
	}
	if _, isGen := parseGenFile(name); isGen {
		p := filepath.Join(l.dir, name)
		if _, _, complete := completeGen(l.dir, name); !complete && len(users[canonical(p)]) == 0 {
			return "image without a valid index, used by no disk found"
		}
	}
	return ""
}

// stalePartials lists the files of partial receives in dir that no push
// touched for age, or whose generation the store holds now (nothing to
// resume), and files that are no partial's.
func (l *Lock) stalePartials(dir string, age time.Duration, now time.Time) ([]Junk, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	newest := map[string]time.Time{} // digest hex -> newest file time
	for _, e := range ents {
		hx, _, _ := strings.Cut(e.Name(), ".")
		fi, err := e.Info()
		if err != nil {
			return nil, err
		}
		if fi.ModTime().After(newest[hx]) {
			newest[hx] = fi.ModTime()
		}
	}
	var junk []Junk
	for _, e := range ents {
		hx, _, _ := strings.Cut(e.Name(), ".")
		why := ""
		if d, ok := parseGenFile(hx + ".qcow2"); !ok {
			why = "not a partial receive's file"
		} else if _, held := l.s.generation(l.name, d); held {
			why = "partial receive of a generation the store holds"
		} else if now.Sub(newest[hx]) > age {
			why = fmt.Sprintf("partial receive untouched since %s", newest[hx].UTC().Format(time.RFC3339))
		}
		if why != "" {
			p := filepath.Join(dir, e.Name())
			junk = append(junk, Junk{Path: p, Why: why, Bytes: diskBytes(p)})
		}
	}
	return junk, nil
}

// removeJunk removes the leftovers, and the partial directory when they
// emptied it.
func (l *Lock) removeJunk(junk []Junk) error {
	for _, j := range junk {
		if err := os.RemoveAll(j.Path); err != nil {
			return fmt.Errorf("store: removing %s: %w", j.Path, err)
		}
	}
	partial := filepath.Join(l.dir, ".partial")
	if ents, err := os.ReadDir(partial); err == nil && len(ents) == 0 {
		if err := os.Remove(partial); err != nil {
			return fmt.Errorf("store: removing %s: %w", partial, err)
		}
	}
	return nil
}

// diskBytes is the disk space path takes (partial raw files are sparse).
func diskBytes(path string) int64 {
	fi, err := os.Lstat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

func (o GCOptions) partialAge() time.Duration {
	if o.PartialAge <= 0 {
		return DefaultPartialAge
	}
	return o.PartialAge
}
