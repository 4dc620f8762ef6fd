package nixclosure

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
)

// Parse reads a closure in any of the forms Nix writes (see the package
// documentation), detecting the form from the content, and validates it.
// name labels errors ("name:LINE: ..."), typically the input's file name.
func Parse(r io.Reader, name string) (*Closure, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	var c *Closure
	switch detect(data) {
	case formatJSON:
		c, err = parseJSON(data, name)
	case formatRegistration:
		c, err = parseLines(data, name, true)
	default:
		c, err = parseLines(data, name, false)
	}
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return c, nil
}

// ParseGraph reads the exportReferencesGraph text format (no hashes): per
// path, the path, a deriver line (usually empty), the number of references and
// the references, one per line. It checks syntax only; see Closure.Validate.
func ParseGraph(r io.Reader) (*Closure, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return parseLines(data, "", false)
}

// ParseRegistration reads the registration format with hashes: per path, the
// path, its NAR hash (bare hex as `nix-store --dump-db` writes it, or
// sha256:<nix32> as closureInfo's registration file has it), the NAR size,
// the deriver or an empty line, the number of references and the references.
// Hashes are normalised to sha256:<nix32>. It checks syntax only; see
// Closure.Validate.
func ParseRegistration(r io.Reader) (*Closure, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return parseLines(data, "", true)
}

type format int

const (
	formatGraph format = iota
	formatRegistration
	formatJSON
)

// detect tells the forms apart: JSON starts with [ or {; in the line formats
// the second line is a deriver (empty or a path) without hashes, and a hash
// with them.
func detect(data []byte) format {
	t := bytes.TrimLeft(data, " \t\r\n")
	if len(t) > 0 && (t[0] == '[' || t[0] == '{') {
		return formatJSON
	}
	_, rest, ok := bytes.Cut(data, []byte("\n"))
	if !ok {
		return formatGraph
	}
	second, _, _ := bytes.Cut(rest, []byte("\n"))
	if len(second) == 0 || second[0] == '/' {
		return formatGraph
	}
	return formatRegistration
}

// lines iterates over the lines of an input, counting them for errors.
type lines struct {
	name string
	data []byte
	line int // number of the line last returned
}

func (l *lines) errorf(line int, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrMalformed, l.at(line), fmt.Sprintf(format, args...))
}

// at names a line for an error: "name:LINE", or "line LINE" without a name.
func (l *lines) at(line int) string {
	if l.name != "" {
		return fmt.Sprintf("%s:%d", l.name, line)
	}
	return fmt.Sprintf("line %d", line)
}

// next returns the next line, or an error naming what was wanted at the end
// of the input.
func (l *lines) next(want string) (string, error) {
	if len(l.data) == 0 {
		return "", l.errorf(l.line+1, "unexpected end of input, want %s", want)
	}
	l.line++
	s, rest, ok := bytes.Cut(l.data, []byte("\n"))
	if !ok {
		rest = nil
	}
	l.data = rest
	return string(s), nil
}

// atEnd reports whether only empty lines remain.
func (l *lines) atEnd() bool {
	return len(bytes.TrimLeft(l.data, "\n")) == 0
}

func parseLines(data []byte, name string, withHashes bool) (*Closure, error) {
	l := &lines{name: name, data: data}
	c := &Closure{StoreDir: DefaultStoreDir}
	seen := map[string]int{}
	for !l.atEnd() {
		path, _ := l.next("a store path")
		pathLine := l.line
		if err := CheckStorePath(DefaultStoreDir, path); err != nil {
			return nil, l.errorf(l.line, "got %q, want a store path (%s/<hash>-<name>)", path, DefaultStoreDir)
		}
		if first, dup := seen[path]; dup {
			return nil, fmt.Errorf("%w: %s: %s, first listed on line %d", ErrDuplicate, l.at(pathLine), path, first)
		}
		seen[path] = pathLine
		pi, err := l.pathInfo(path, withHashes)
		if err != nil {
			return nil, err
		}
		c.Paths = append(c.Paths, pi)
	}
	c.Sort()
	if err := checkRepeatedRefs(c, l, seen); err != nil {
		return nil, err
	}
	return c, nil
}

// pathInfo reads the lines after a path's: its hash and size (withHashes),
// its deriver and its references.
func (l *lines) pathInfo(path string, withHashes bool) (PathInfo, error) {
	pi := PathInfo{Path: path}
	if withHashes {
		var err error
		if pi.NarHash, pi.NarSize, err = l.hashAndSize(); err != nil {
			return pi, err
		}
	}
	d, err := l.next("a deriver or an empty line")
	if err != nil {
		return pi, err
	}
	if d != "" {
		if err := CheckStorePath(DefaultStoreDir, d); err != nil {
			return pi, l.errorf(l.line, "got %q, want a deriver store path or an empty line", d)
		}
	}
	pi.Deriver = d
	pi.References, err = l.references()
	return pi, err
}

// hashAndSize reads a NAR hash line and a NAR size line.
func (l *lines) hashAndSize() (string, uint64, error) {
	h, err := l.next("a NAR hash")
	if err != nil {
		return "", 0, err
	}
	hash, err := NormaliseHash(h)
	if err != nil {
		return "", 0, l.errorf(l.line, "got %q, want a sha256 NAR hash (hex or sha256:<nix32>)", h)
	}
	s, err := l.next("a NAR size")
	if err != nil {
		return "", 0, err
	}
	size, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return "", 0, l.errorf(l.line, "got %q, want a NAR size (decimal)", s)
	}
	return hash, size, nil
}

// references reads a number of references and as many store paths.
func (l *lines) references() ([]string, error) {
	s, err := l.next("a number of references")
	if err != nil {
		return nil, err
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || (len(s) > 1 && s[0] == '0') {
		return nil, l.errorf(l.line, "got %q, want a number of references (decimal)", s)
	}
	if n > uint64(bytes.Count(l.data, []byte("\n"))+1) {
		return nil, l.errorf(l.line, "got %d references, but only %d lines remain", n, bytes.Count(l.data, []byte("\n"))+1)
	}
	refs := make([]string, 0, n)
	for i := uint64(0); i < n; i++ {
		r, err := l.next(fmt.Sprintf("reference %d of %d", i+1, n))
		if err != nil {
			return nil, err
		}
		if err := CheckStorePath(DefaultStoreDir, r); err != nil {
			return nil, l.errorf(l.line, "got %q, want reference %d of %d (a store path)", r, i+1, n)
		}
		refs = append(refs, r)
	}
	return refs, nil
}

// checkRepeatedRefs fails with ErrDuplicate on a sorted closure's path that
// lists a reference twice, naming the line (seen) where the path is.
func checkRepeatedRefs(c *Closure, l *lines, seen map[string]int) error {
	for _, p := range c.Paths {
		for j := 1; j < len(p.References); j++ {
			if p.References[j] == p.References[j-1] {
				return fmt.Errorf("%w: %s: %s lists reference %s twice", ErrDuplicate, l.at(seen[p.Path]), p.Path, p.References[j])
			}
		}
	}
	return nil
}
