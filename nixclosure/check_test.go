package nixclosure

import (
	"errors"
	"testing"
)

func TestCheckHash(t *testing.T) {
	p := PathInfo{Path: pA, NarHash: n32A, NarSize: 120}
	if err := p.CheckHash("sha256:"+hexA, 120); err != nil {
		t.Errorf("same hash in base16: %v", err)
	}
	if err := p.CheckHash(n32B, 120); !errors.Is(err, ErrHashMismatch) {
		t.Errorf("other hash: got %v, want ErrHashMismatch", err)
	}
	if err := p.CheckHash(n32A, 121); !errors.Is(err, ErrHashMismatch) {
		t.Errorf("other size: got %v, want ErrHashMismatch", err)
	}
	if err := (&PathInfo{Path: pA}).CheckHash(n32B, 7); err != nil {
		t.Errorf("no recorded hash: %v", err)
	}
}

func TestTopoOrder(t *testing.T) {
	c := &Closure{Paths: []PathInfo{
		{Path: pA, References: []string{pA, pC}},
		{Path: pB, References: []string{pA}},
		{Path: pC},
	}}
	order, err := c.TopoOrder()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range order {
		got = append(got, p.Path)
	}
	if want := []string{pC, pA, pB}; len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Errorf("got %q, want %q", got, want)
	}
	c.Paths[2].References = []string{pB}
	if _, err := c.TopoOrder(); !errors.Is(err, ErrMalformed) {
		t.Errorf("cycle: got %v, want ErrMalformed", err)
	}
}
