package nixclosure

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestSmallFixture runs the parsers and the NAR code over the project's
// realistic test closure (testkit/fixture "small": ~75 MB, 19 paths of
// Debian packages with real references, 255-byte and non-ASCII names, a
// 5,000-entry directory, hard links): the four descriptions Nix produced must
// agree, and every path's HashPath must equal Nix's recorded hash.
func TestSmallFixture(t *testing.T) {
	testutil.Short(t)
	f := fixture.Build(t, "small")
	parse := func(name string) *Closure {
		t.Helper()
		fh, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		defer fh.Close()
		c, err := Parse(fh, name)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Paths) != len(f.Paths) {
			t.Fatalf("%s: got %d paths, want %d", name, len(c.Paths), len(f.Paths))
		}
		return c
	}
	dump := parse(f.DumpDBFile)
	reg := parse(f.RegistrationFile)
	graph := parse(f.GraphFile)
	js := parse(f.JSONFile)
	for i, want := range dump.Paths {
		noDrv := want
		noDrv.Deriver = ""
		if !equalInfo(reg.Paths[i], noDrv) { // closureInfo leaves the deriver out
			t.Errorf("registration: got %+v, want %+v", reg.Paths[i], noDrv)
		}
		if !equalInfo(js.Paths[i], noDrv) {
			t.Errorf("json: got %+v, want %+v", js.Paths[i], noDrv)
		}
		bare := noDrv
		bare.NarHash, bare.NarSize = "", 0
		if !equalInfo(graph.Paths[i], bare) {
			t.Errorf("graph: got %+v, want %+v", graph.Paths[i], bare)
		}
	}
	ft, err := FromToplevel(t.Context(), f.Toplevel)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(ft.Paths) != fmt.Sprint(dump.Paths) {
		t.Errorf("FromToplevel differs from the dump-db file")
	}
	if order, err := dump.TopoOrder(); err != nil || order[len(order)-1].Path != f.Toplevel {
		t.Errorf("TopoOrder: want the toplevel last, got %v", err)
	}
	for i := range dump.Paths {
		p := &dump.Paths[i]
		h, size, err := HashPath(p.Path)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.CheckHash(h, size); err != nil {
			t.Error(err)
		}
	}
	for _, prefix := range []string{"edge-cases", "many-files"} {
		p := f.Path(prefix)
		var got bytes.Buffer
		if err := DumpPath(&got, p); err != nil {
			t.Fatal(err)
		}
		if want := testutil.Run(t, "nix-store", "--dump", p); !bytes.Equal(got.Bytes(), want) {
			t.Errorf("DumpPath(%s) differs from nix-store --dump (%d vs %d bytes)", p, got.Len(), len(want))
		}
	}
}
