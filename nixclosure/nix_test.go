package nixclosure

import (
	"bytes"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

var (
	fixturesOnce sync.Once
	fixtures     map[string]string
	fixturesErr  error
)

// fixtureAttrs are the attributes of testdata/fixtures.nix.
var fixtureAttrs = []string{"tree", "file", "script", "link", "top", "graph", "sgraph"}

// buildFixtures builds testdata/fixtures.nix with the real Nix, once per test
// binary, and returns each attribute's output path. The salt is the time, so
// every run builds fresh paths.
func buildFixtures(t testing.TB) map[string]string {
	t.Helper()
	testutil.NeedTool(t, "nix-build", "nix-store")
	testutil.NeedRoot(t)
	fixturesOnce.Do(func() {
		expr, err := filepath.Abs("testdata/fixtures.nix")
		if err != nil {
			fixturesErr = err
			return
		}
		args := append([]string{expr, "--no-out-link", "--argstr", "salt", fmt.Sprint(time.Now().UnixNano())}, testutil.NixOffline...)
		for _, a := range fixtureAttrs {
			args = append(args, "-A", a)
		}
		cmd := exec.Command("nix-build", args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			fixturesErr = fmt.Errorf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
			return
		}
		outs := strings.Fields(stdout.String())
		if len(outs) != len(fixtureAttrs) {
			fixturesErr = fmt.Errorf("nix-build printed %d paths, want %d: %q", len(outs), len(fixtureAttrs), outs)
			return
		}
		fixtures = map[string]string{}
		for i, a := range fixtureAttrs {
			fixtures[a] = outs[i]
		}
	})
	if fixturesErr != nil {
		t.Fatal(fixturesErr)
	}
	return fixtures
}

// TestNarMatchesNix checks DumpPath byte for byte against `nix-store --dump`
// and HashPath against `nix-store --query --hash/--size` for real store paths
// (files, executables, symlinks, empty and nested directories, a file, an
// executable file and a symlink as the whole path).
func TestNarMatchesNix(t *testing.T) {
	fx := buildFixtures(t)
	for _, a := range []string{"tree", "file", "script", "link", "top"} {
		p := fx[a]
		t.Run(a, func(t *testing.T) {
			want := testutil.Run(t, "nix-store", "--dump", p)
			var got bytes.Buffer
			if err := DumpPath(&got, p); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Bytes(), want) {
				i := 0
				for i < got.Len() && i < len(want) && got.Bytes()[i] == want[i] {
					i++
				}
				t.Fatalf("DumpPath(%s) differs from nix-store --dump at byte %d (got %d bytes, want %d)", p, i, got.Len(), len(want))
			}
			hash, size, err := HashPath(p)
			if err != nil {
				t.Fatal(err)
			}
			wantHash := strings.TrimSpace(string(testutil.Run(t, "nix-store", "--query", "--hash", p)))
			wantSize := strings.TrimSpace(string(testutil.Run(t, "nix-store", "--query", "--size", p)))
			if hash != wantHash {
				t.Errorf("HashPath(%s) hash: got %s, want %s", p, hash, wantHash)
			}
			if fmt.Sprint(size) != wantSize {
				t.Errorf("HashPath(%s) size: got %d, want %s", p, size, wantSize)
			}
		})
	}
}

// TestParseRealOutputs parses what Nix 2.8 really writes: --dump-db,
// exportReferencesGraph text and structured-attrs JSON of the same closure,
// and checks them against each other and against nix-store queries.
func TestParseRealOutputs(t *testing.T) {
	fx := buildFixtures(t)
	reqs := strings.Fields(string(testutil.Run(t, "nix-store", "--query", "--requisites", fx["top"])))
	dump := testutil.Run(t, "nix-store", append([]string{"--dump-db"}, reqs...)...)

	reg, err := Parse(bytes.NewReader(dump), "dump-db")
	if err != nil {
		t.Fatal(err)
	}
	if len(reg.Paths) != 4 {
		t.Fatalf("dump-db: got %d paths, want 4 (top, tree, file, link)", len(reg.Paths))
	}
	for _, p := range reg.Paths {
		wantHash := strings.TrimSpace(string(testutil.Run(t, "nix-store", "--query", "--hash", p.Path)))
		if p.NarHash != wantHash {
			t.Errorf("%s: hash: got %s, want %s", p.Path, p.NarHash, wantHash)
		}
		wantRefs := strings.Fields(string(testutil.Run(t, "nix-store", "--query", "--references", p.Path)))
		if strings.Join(p.References, " ") != strings.Join(sorted(wantRefs), " ") {
			t.Errorf("%s: references: got %q, want %q", p.Path, p.References, wantRefs)
		}
		wantDrv := strings.TrimSpace(string(testutil.Run(t, "nix-store", "--query", "--deriver", p.Path)))
		if p.Deriver != wantDrv {
			t.Errorf("%s: deriver: got %q, want %q", p.Path, p.Deriver, wantDrv)
		}
		if h, size, err := HashPath(p.Path); err != nil || h != p.NarHash || size != p.NarSize {
			t.Errorf("%s: HashPath: got %s %d %v, want %s %d", p.Path, h, size, err, p.NarHash, p.NarSize)
		}
	}
	if l := reg.Lookup(fx["top"]); l == nil || !contains(l.References, fx["top"]) {
		t.Errorf("top: want a self reference, got %+v", l)
	}

	// exportReferencesGraph text: same paths and references, no hashes, and
	// Nix leaves the deriver line empty.
	graph, err := Parse(bytes.NewReader(testutil.Run(t, "cat", fx["graph"])), "graph")
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range graph.Paths {
		want := reg.Paths[i]
		want.NarHash, want.NarSize, want.Deriver = "", 0, ""
		if !equalInfo(p, want) {
			t.Errorf("graph: got %+v, want %+v", p, want)
		}
	}
	if len(graph.Paths) != len(reg.Paths) {
		t.Errorf("graph: got %d paths, want %d", len(graph.Paths), len(reg.Paths))
	}

	// Structured attrs JSON: the whole .attrs.json, closure under "closure".
	js, err := Parse(bytes.NewReader(testutil.Run(t, "cat", fx["sgraph"])), "attrs.json")
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range js.Paths {
		want := reg.Paths[i]
		want.Deriver = ""
		if !equalInfo(p, want) {
			t.Errorf("json: got %+v, want %+v", p, want)
		}
	}
	if len(js.Paths) != len(reg.Paths) {
		t.Errorf("json: got %d paths, want %d", len(js.Paths), len(reg.Paths))
	}

	// FromToplevel runs the same commands.
	ft, err := FromToplevel(t.Context(), fx["top"])
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(ft.Paths) != fmt.Sprint(reg.Paths) {
		t.Errorf("FromToplevel: got %+v, want %+v", ft.Paths, reg.Paths)
	}
	if _, err := FromToplevel(t.Context(), "/nix/store/00000000000000000000000000000000-missing"); err == nil ||
		!strings.Contains(err.Error(), "nix-store --query --requisites") {
		t.Errorf("FromToplevel(missing): got %v, want an error naming the command", err)
	}
}

func sorted(s []string) []string {
	s = append([]string(nil), s...)
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

func equalInfo(a, b PathInfo) bool {
	return a.Path == b.Path && a.NarHash == b.NarHash && a.NarSize == b.NarSize && a.Deriver == b.Deriver &&
		strings.Join(a.References, " ") == strings.Join(b.References, " ")
}
