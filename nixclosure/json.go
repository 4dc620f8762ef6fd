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
	l := &lines{name: name}
	lineOf := func(off int64) int {
		if off > int64(len(data)) {
			off = int64(len(data))
		}
		return bytes.Count(data[:off], []byte("\n")) + 1
	}
	wrap := func(err error) error {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return l.errorf(lineOf(se.Offset), "%v", err)
		case errors.As(err, &te):
			return l.errorf(lineOf(te.Offset), "%v", err)
		}
		return l.errorf(lineOf(int64(len(data))), "%v", err)
	}
	var raw json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, wrap(err)
	}
	base := int64(0) // offset of the array within data
	if t := bytes.TrimLeft(raw, " \t\r\n"); len(t) > 0 && t[0] == '{' {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			return nil, wrap(err)
		}
		arr, ok := obj["closure"]
		if !ok {
			return nil, l.errorf(1, "got a JSON object without \"closure\", want an array of paths or {\"closure\": [...]}")
		}
		raw = arr
		base = int64(bytes.Index(data, arr))
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	tok, err := dec.Token()
	if err != nil {
		return nil, wrap(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, l.errorf(lineOf(base), "got %v, want a JSON array of paths", tok)
	}
	c := &Closure{StoreDir: DefaultStoreDir}
	seen := map[string]int{}
	for dec.More() {
		start := base + dec.InputOffset()
		for start < int64(len(data)) && bytes.IndexByte([]byte(" \t\r\n,"), data[start]) >= 0 {
			start++
		}
		var jp jsonPath
		if err := dec.Decode(&jp); err != nil {
			var se *json.SyntaxError
			var te *json.UnmarshalTypeError
			switch {
			case errors.As(err, &se):
				return nil, l.errorf(lineOf(base+se.Offset), "%v", err)
			case errors.As(err, &te):
				return nil, l.errorf(lineOf(start), "%v", err)
			}
			return nil, l.errorf(lineOf(start), "%v", err)
		}
		line := lineOf(start)
		if jp.Path == nil {
			return nil, l.errorf(line, "element without \"path\", want {path, narHash, narSize, references}")
		}
		pi := PathInfo{Path: *jp.Path, NarSize: jp.NarSize, References: jp.References}
		if err := CheckStorePath(DefaultStoreDir, pi.Path); err != nil {
			return nil, l.errorf(line, "path: got %q, want a store path", pi.Path)
		}
		if first, dup := seen[pi.Path]; dup {
			return nil, fmt.Errorf("%w: %s: %s, first listed on line %d", ErrDuplicate, l.at(line), pi.Path, first)
		}
		seen[pi.Path] = line
		if jp.NarHash != "" {
			if pi.NarHash, err = NormaliseHash(jp.NarHash); err != nil {
				return nil, l.errorf(line, "narHash: got %q, want sha256:<nix32> or sha256-<base64>", jp.NarHash)
			}
		}
		if jp.Deriver != nil {
			pi.Deriver = *jp.Deriver
			if pi.Deriver != "" {
				if err := CheckStorePath(DefaultStoreDir, pi.Deriver); err != nil {
					return nil, l.errorf(line, "deriver: got %q, want a store path", pi.Deriver)
				}
			}
		}
		if pi.References == nil {
			pi.References = []string{}
		}
		for _, r := range pi.References {
			if err := CheckStorePath(DefaultStoreDir, r); err != nil {
				return nil, l.errorf(line, "references: got %q, want a store path", r)
			}
		}
		c.Paths = append(c.Paths, pi)
	}
	if _, err := dec.Token(); err != nil {
		return nil, wrap(err)
	}
	c.Sort()
	for _, p := range c.Paths {
		for j := 1; j < len(p.References); j++ {
			if p.References[j] == p.References[j-1] {
				return nil, fmt.Errorf("%w: %s: %s lists reference %s twice", ErrDuplicate, l.at(seen[p.Path]), p.Path, p.References[j])
			}
		}
	}
	return c, nil
}
