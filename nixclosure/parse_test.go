package nixclosure

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

const (
	pA   = "/nix/store/00000000000000000000000000000000-a"
	pB   = "/nix/store/11111111111111111111111111111111-b"
	pC   = "/nix/store/22222222222222222222222222222222-c"
	drvA = "/nix/store/33333333333333333333333333333333-a.drv"
	hexA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	n32A = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
	hexB = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	n32B = "sha256:1vydmf4nfi9307pwvaw9cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"
)

func lines2(ls ...string) string { return strings.Join(ls, "\n") + "\n" }

// want is the closure every valid input below describes (hashes aside).
func wantClosure(hashes bool) []PathInfo {
	a := PathInfo{Path: pA, Deriver: drvA, References: []string{pA, pB}}
	b := PathInfo{Path: pB, References: []string{}}
	if hashes {
		a.NarHash, a.NarSize = n32A, 120
		b.NarHash, b.NarSize = n32B, 8
	}
	return []PathInfo{a, b}
}

func TestParseValid(t *testing.T) {
	tests := []struct {
		name, in string
		hashes   bool
	}{
		{"dump-db", lines2(pB, hexB, "8", "", "0", pA, hexA, "120", drvA, "2", pB, pA), true},
		{"closureInfo registration", lines2(pA, n32A, "120", drvA, "2", pA, pB, pB, n32B, "8", "", "0"), true},
		{"no final newline", strings.TrimSuffix(lines2(pA, n32A, "120", drvA, "2", pA, pB, pB, n32B, "8", "", "0"), "\n"), true},
		{"graph", lines2(pA, drvA, "2", pA, pB, pB, "", "0"), false},
		{"json array", `[{"path":"` + pB + `","narHash":"` + n32B + `","narSize":8,"references":[]},
 {"closureSize":1,"narHash":"` + n32A + `","narSize":120,"path":"` + pA + `","deriver":"` + drvA + `","references":["` + pB + `","` + pA + `"]}]`, true},
		{"json attrs", `{"closure":[{"path":"` + pA + `","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120,"deriver":"` + drvA + `","references":["` + pA + `","` + pB + `"]},
 {"path":"` + pB + `","narHash":"sha256:` + hexB + `","narSize":8}], "name":"x"}`, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(strings.NewReader(tt.in), "in")
			if err != nil {
				t.Fatal(err)
			}
			want := wantClosure(tt.hashes)
			if got := fmt.Sprintf("%+v", c.Paths); got != fmt.Sprintf("%+v", want) {
				t.Errorf("got  %s\nwant %+v", got, want)
			}
			if c.HasHashes() != tt.hashes {
				t.Errorf("HasHashes: got %v, want %v", c.HasHashes(), tt.hashes)
			}
		})
	}
	c, err := Parse(strings.NewReader(""), "empty")
	if err != nil || len(c.Paths) != 0 {
		t.Errorf("empty input: got %+v, %v, want an empty closure", c, err)
	}
}

func TestParseMalformed(t *testing.T) {
	tests := []struct {
		name, in string
		err      error
		msg      string // must appear in the error
	}{
		{"not a path", lines2("hello", "", "0"), ErrMalformed, "in:1: got \"hello\", want a store path"},
		{"bad hash part", lines2("/nix/store/e0000000000000000000000000000000-a", "", "0"), ErrMalformed, "in:1:"},
		{"outside store", lines2("/usr/store/00000000000000000000000000000000-a", "", "0"), ErrMalformed, "in:1:"},
		{"bad name", lines2("/nix/store/00000000000000000000000000000000-a b", "", "0"), ErrMalformed, "in:1:"},
		{"dot name", lines2("/nix/store/00000000000000000000000000000000-.a", "", "0"), ErrMalformed, "in:1:"},
		{"missing count", lines2(pA, ""), ErrMalformed, "in:3: unexpected end of input, want a number of references"},
		{"bad count", lines2(pA, "", "two"), ErrMalformed, "in:3: got \"two\", want a number of references"},
		{"negative count", lines2(pA, "", "-1"), ErrMalformed, "in:3:"},
		{"leading zero count", lines2(pA, "", "01", pA), ErrMalformed, "in:3:"},
		{"too many refs", lines2(pA, "", "5", pA), ErrMalformed, "in:3: got 5 references, but only"},
		{"short refs", lines2(pB, "", "0", pA, "", "2", pA), ErrMalformed, "in:8: unexpected end of input, want reference 2 of 2"},
		{"bad ref", lines2(pB, "", "0", pA, "", "1", "nope"), ErrMalformed, "in:7: got \"nope\", want reference 1 of 1"},
		{"bad deriver", lines2(pA, "/nix/store/x.drv", "0"), ErrMalformed, "in:2:"},
		{"bad hash", lines2(pA, "sha256:xyz", "1", "", "0"), ErrMalformed, "in:2: got \"sha256:xyz\", want a sha256 NAR hash"},
		{"md5 hash", lines2(pA, "md5:00000000000000000000000000000000", "1", "", "0"), ErrMalformed, "in:2:"},
		{"bad size", lines2(pA, hexA, "-1", "", "0"), ErrMalformed, "in:3: got \"-1\", want a NAR size"},
		{"missing size", pA + "\n" + hexA + "\n", ErrMalformed, "in:3: unexpected end of input, want a NAR size"},
		{"hash, truncated", pA + "\n" + hexA, ErrMalformed, "in:3:"},
		{"duplicate path", lines2(pA, "", "0", pB, "", "0", pA, "", "0"), ErrDuplicate, "in:7: " + pA + ", first listed on line 1"},
		{"duplicate ref", lines2(pA, "", "2", pA, pA), ErrDuplicate, "in:1: " + pA + " lists reference " + pA + " twice"},
		{"dangling", lines2(pA, "", "1", pC), ErrDanglingReference, pA + " references " + pC},
		{"blank path line", lines2(pA, "", "0", "", pB, "", "0"), ErrMalformed, "in:4: got \"\", want a store path"},
		{"json syntax", "[\n{\"path\": }\n]", ErrMalformed, "in:2:"},
		{"json type", "[\n{\"path\": \"" + pA + "\", \"narSize\": \"x\"}]", ErrMalformed, "in:2:"},
		{"json no path", "[\n{}\n]", ErrMalformed, "in:2: element without \"path\""},
		{"json bad path", "[\n\n{\"path\": \"/tmp/x\"}]", ErrMalformed, "in:3: path: got \"/tmp/x\""},
		{"json bad hash", "[{\"path\": \"" + pA + "\", \"narHash\": \"sha256-x\"}]", ErrMalformed, "in:1: narHash: got \"sha256-x\""},
		{"json bad ref", "[{\"path\": \"" + pA + "\", \"references\": [\"x\"]}]", ErrMalformed, "references: got \"x\""},
		{"json bad deriver", "[{\"path\": \"" + pA + "\", \"deriver\": \"x\"}]", ErrMalformed, "deriver: got \"x\""},
		{"json object", "{\"paths\": []}", ErrMalformed, "without \"closure\""},
		{"json not array", "{\"closure\": 3}", ErrMalformed, "want a JSON array"},
		{"json duplicate", "[{\"path\": \"" + pA + "\"},\n{\"path\": \"" + pA + "\"}]", ErrDuplicate, "in:2: " + pA + ", first listed on line 1"},
		{"json dangling", "[{\"path\": \"" + pA + "\", \"references\": [\"" + pB + "\"]}]", ErrDanglingReference, pB},
		{"json trailing", "[] x", ErrMalformed, "in:1:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(tt.in), "in")
			if !errors.Is(err, tt.err) {
				t.Fatalf("got %v, want %v", err, tt.err)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("got %q, want it to contain %q", err, tt.msg)
			}
		})
	}
}

func TestParseFormatSpecific(t *testing.T) {
	// A graph parser does not take hashes, a registration parser needs them.
	if _, err := ParseGraph(strings.NewReader(lines2(pA, hexA, "1", "", "0"))); !errors.Is(err, ErrMalformed) {
		t.Errorf("ParseGraph(registration): got %v, want ErrMalformed", err)
	}
	if _, err := ParseRegistration(strings.NewReader(lines2(pA, "", "0"))); !errors.Is(err, ErrMalformed) ||
		!strings.Contains(err.Error(), "line 2:") {
		t.Errorf("ParseRegistration(graph): got %v, want ErrMalformed at line 2", err)
	}
	c, err := ParseJSON(strings.NewReader(`[{"path":"` + pA + `"}]`))
	if err != nil || len(c.Paths) != 1 || c.Paths[0].References == nil {
		t.Errorf("ParseJSON: got %+v, %v", c, err)
	}
	// The syntax-only parsers leave dangling references to Validate.
	c, err = ParseGraph(strings.NewReader(lines2(pA, "", "1", pC)))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); !errors.Is(err, ErrDanglingReference) {
		t.Errorf("Validate: got %v, want ErrDanglingReference", err)
	}
}

func TestValidate(t *testing.T) {
	ok := func() *Closure {
		return &Closure{StoreDir: "/nix/store", Paths: []PathInfo{
			{Path: pA, NarHash: n32A, References: []string{pA, pB}, Deriver: drvA},
			{Path: pB, NarHash: n32B},
		}}
	}
	if err := ok().Validate(); err != nil {
		t.Fatalf("valid closure: %v", err)
	}
	tests := []struct {
		name   string
		modify func(c *Closure)
		err    error
	}{
		{"duplicate", func(c *Closure) { c.Paths[1].Path = pA }, ErrDuplicate},
		{"unsorted", func(c *Closure) { c.Paths[0], c.Paths[1] = c.Paths[1], c.Paths[0] }, ErrMalformed},
		{"other store dir", func(c *Closure) { c.StoreDir = "/gnu/store" }, ErrNotInStore},
		{"short hash part", func(c *Closure) { c.Paths[1].Path = "/nix/store/1111-b" }, ErrNotInStore},
		{"long name", func(c *Closure) { c.Paths[1].Path = pB + strings.Repeat("b", 211) }, ErrNotInStore},
		{"dangling", func(c *Closure) { c.Paths[1].References = []string{pC} }, ErrDanglingReference},
		{"ref not a path", func(c *Closure) { c.Paths[1].References = []string{"/nix/store/x"} }, ErrNotInStore},
		{"refs unsorted", func(c *Closure) { c.Paths[0].References = []string{pB, pA} }, ErrMalformed},
		{"refs duplicate", func(c *Closure) { c.Paths[0].References = []string{pB, pB} }, ErrDuplicate},
		{"hash not nix32", func(c *Closure) { c.Paths[0].NarHash = "sha256:" + hexA }, ErrMalformed},
		{"hash garbage", func(c *Closure) { c.Paths[0].NarHash = "x" }, ErrMalformed},
		{"deriver", func(c *Closure) { c.Paths[0].Deriver = "/tmp/a.drv" }, ErrNotInStore},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok()
			tt.modify(c)
			if err := c.Validate(); !errors.Is(err, tt.err) {
				t.Errorf("got %v, want %v", err, tt.err)
			}
		})
	}
}

// FuzzParse checks that Parse never panics and that whatever it accepts is
// valid and survives a write-and-parse round trip in the registration form.
func FuzzParse(f *testing.F) {
	f.Add(lines2(pA, n32A, "120", drvA, "2", pA, pB, pB, n32B, "8", "", "0"))
	f.Add(lines2(pA, drvA, "2", pA, pB, pB, "", "0"))
	f.Add(`{"closure":[{"path":"` + pA + `","narHash":"` + n32A + `","narSize":1,"references":[]}]}`)
	f.Fuzz(func(t *testing.T, in string) {
		c, err := Parse(strings.NewReader(in), "fuzz")
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrDuplicate) &&
				!errors.Is(err, ErrDanglingReference) && !errors.Is(err, ErrNotInStore) {
				t.Fatalf("error without a sentinel: %v", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted an invalid closure: %v", err)
		}
		var b strings.Builder
		for _, p := range c.Paths {
			if c.HasHashes() {
				fmt.Fprintf(&b, "%s\n%s\n%d\n", p.Path, p.NarHash, p.NarSize)
			} else {
				fmt.Fprintf(&b, "%s\n", p.Path)
			}
			fmt.Fprintf(&b, "%s\n%d\n", p.Deriver, len(p.References))
			for _, r := range p.References {
				fmt.Fprintf(&b, "%s\n", r)
			}
		}
		c2, err := Parse(strings.NewReader(b.String()), "again")
		if err != nil {
			t.Fatalf("reparse of %q: %v", b.String(), err)
		}
		if !c.HasHashes() {
			for i := range c.Paths { // the graph form carries neither
				c.Paths[i].NarHash, c.Paths[i].NarSize = "", 0
			}
		}
		if fmt.Sprint(c2.Paths) != fmt.Sprint(c.Paths) {
			t.Fatalf("round trip: got %+v, want %+v", c2.Paths, c.Paths)
		}
	})
}
