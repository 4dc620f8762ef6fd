package nixclosure

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// jsonPath is one element of the structured-attrs exportReferencesGraph JSON.
// Nix 2.8 writes closureSize, narHash, narSize, path and references; later
// versions add deriver, valid and signatures. Unknown fields are ignored.
type jsonPath struct {
	Path       *string  `json:"path"`
	NarHash    string   `json:"narHash"`
	NarSize    uint64   `json:"narSize"`
	Deriver    *string  `json:"deriver"`
	References []string `json:"references"`
}

// ParseJSON reads the JSON that exportReferencesGraph writes with
// __structuredAttrs: an array of {path, narHash, narSize, references}, or an
// object holding that array under "closure" (such as a whole .attrs.json for
// exportReferencesGraph.closure). It checks syntax only; see
// Closure.Validate.
func ParseJSON(r io.Reader) (*Closure, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return parseJSON(data, "")
}

func parseJSON(data []byte, name string) (*Closure, error) {
	doc := &jsonDoc{lines: lines{name: name}, data: data}
	arr, base, err := doc.closureArray()
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(arr))
	tok, err := dec.Token()
	if err != nil {
		return nil, doc.wrap(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, doc.errorf(doc.lineOf(base), "got %v, want a JSON array of paths", tok)
	}
	c := &Closure{StoreDir: DefaultStoreDir}
	seen := map[string]int{}
	for dec.More() {
		pi, err := doc.decodePath(dec, base, seen)
		if err != nil {
			return nil, err
		}
		c.Paths = append(c.Paths, pi)
	}
	if _, err := dec.Token(); err != nil {
		return nil, doc.wrap(err)
	}
	c.Sort()
	if err := checkRepeatedRefs(c, &doc.lines, seen); err != nil {
		return nil, err
	}
	return c, nil
}

// jsonDoc is a JSON input, with its line numbers for errors.
type jsonDoc struct {
	lines
	data []byte
}

// lineOf is the line of the byte at off.
func (d *jsonDoc) lineOf(off int64) int {
	off = min(off, int64(len(d.data)))
	return bytes.Count(d.data[:off], []byte("\n")) + 1
}

// wrap turns an error decoding the whole input into ErrMalformed at its
// line (the last line when the error has no offset).
func (d *jsonDoc) wrap(err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return d.errorf(d.lineOf(se.Offset), "%v", err)
	case errors.As(err, &te):
		return d.errorf(d.lineOf(te.Offset), "%v", err)
	}
	return d.errorf(d.lineOf(int64(len(d.data))), "%v", err)
}

// closureArray returns the array of paths, the whole input or its
// "closure" member, and its offset in the input.
func (d *jsonDoc) closureArray() (json.RawMessage, int64, error) {
	var raw json.RawMessage
	if err := json.Unmarshal(d.data, &raw); err != nil {
		return nil, 0, d.wrap(err)
	}
	if t := bytes.TrimLeft(raw, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return raw, 0, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, 0, d.wrap(err)
	}
	arr, ok := obj["closure"]
	if !ok {
		return nil, 0, d.errorf(1, "got a JSON object without \"closure\", want an array of paths or {\"closure\": [...]}")
	}
	return arr, int64(bytes.Index(d.data, arr)), nil
}

// decodePath decodes the next element of the array, which starts at base
// in the input; seen holds the line of each path decoded before.
func (d *jsonDoc) decodePath(dec *json.Decoder, base int64, seen map[string]int) (PathInfo, error) {
	start := base + dec.InputOffset()
	for start < int64(len(d.data)) && bytes.IndexByte([]byte(" \t\r\n,"), d.data[start]) >= 0 {
		start++
	}
	var jp jsonPath
	if err := dec.Decode(&jp); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return PathInfo{}, d.errorf(d.lineOf(base+se.Offset), "%v", err)
		}
		return PathInfo{}, d.errorf(d.lineOf(start), "%v", err)
	}
	line := d.lineOf(start)
	if jp.Path == nil {
		return PathInfo{}, d.errorf(line, "element without \"path\", want {path, narHash, narSize, references}")
	}
	if err := CheckStorePath(DefaultStoreDir, *jp.Path); err != nil {
		return PathInfo{}, d.errorf(line, "path: got %q, want a store path", *jp.Path)
	}
	if first, dup := seen[*jp.Path]; dup {
		return PathInfo{}, fmt.Errorf("%w: %s: %s, first listed on line %d", ErrDuplicate, d.at(line), *jp.Path, first)
	}
	seen[*jp.Path] = line
	pi, err := jp.pathInfo()
	if err != nil {
		return PathInfo{}, d.errorf(line, "%v", err)
	}
	return pi, nil
}

// pathInfo checks the fields of an element whose path is checked, and
// returns them as a PathInfo.
func (jp *jsonPath) pathInfo() (PathInfo, error) {
	pi := PathInfo{Path: *jp.Path, NarSize: jp.NarSize, References: jp.References}
	if jp.NarHash != "" {
		var err error
		if pi.NarHash, err = NormaliseHash(jp.NarHash); err != nil {
			return PathInfo{}, fmt.Errorf("narHash: got %q, want sha256:<nix32> or sha256-<base64>", jp.NarHash)
		}
	}
	if jp.Deriver != nil {
		pi.Deriver = *jp.Deriver
		if pi.Deriver != "" && CheckStorePath(DefaultStoreDir, pi.Deriver) != nil {
			return PathInfo{}, fmt.Errorf("deriver: got %q, want a store path", pi.Deriver)
		}
	}
	if pi.References == nil {
		pi.References = []string{}
	}
	for _, r := range pi.References {
		if err := CheckStorePath(DefaultStoreDir, r); err != nil {
			return PathInfo{}, fmt.Errorf("references: got %q, want a store path", r)
		}
	}
	return pi, nil
}
