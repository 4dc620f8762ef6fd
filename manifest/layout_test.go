package manifest

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func sampleLayout() *Layout {
	l := &Layout{RootOffset: 1 << 20, RootSize: 1 << 30}
	l.Lineage = "abcd-nixos-system-test"
	l.UUID[0], l.HashSeed[15] = 7, 9
	l.Units = []Unit{
		{Name: "", Inodes: []Run{{12, 2}}, Blocks: []Run{{4000, 1024}, {9000, 7}}},
		{Name: "abc-hello-2.12", Inodes: []Run{{14, 30}}, Blocks: []Run{{5024, 300}, {32768 + 600, 1}}},
		{Name: "nix/var/nix/db/db.sqlite", Inodes: []Run{{44, 1}}, Blocks: []Run{{1 << 33, 1<<40 + 1}}},
		{Name: "z-empty"},
	}
	return l
}

func TestLayoutRoundTrip(t *testing.T) {
	m := hashChunked(t, disk(newRand(7), 40960), 1, newRand(8))
	plain := encode(t, m)
	m.Layout = sampleLayout()
	enc := encode(t, m)
	if !bytes.HasPrefix(enc[fileHeaderLen:], plain[fileHeaderLen:len(plain)-checksumLen]) {
		t.Error("the block list changed with a layout")
	}
	got, err := Read(bytes.NewReader(enc))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Layout, m.Layout) {
		t.Errorf("layout: got %+v, want %+v", got.Layout, m.Layout)
	}
	if got.Digest != m.Digest {
		t.Error("digest changed")
	}
	if u := got.Layout.Unit("abc-hello-2.12"); u == nil || u.Inodes[0].Start != 14 {
		t.Errorf("Unit(abc-hello-2.12): got %+v", u)
	}
	if got.Layout.Unit("missing") != nil || got.Layout.Unit("") == nil {
		t.Error("Unit lookup of missing or empty name wrong")
	}
	// Without a layout: nil, and the encoding is the plain one.
	got, err = Read(bytes.NewReader(plain))
	if err != nil || got.Layout != nil {
		t.Fatalf("plain manifest: layout %v, err %v", got.Layout, err)
	}
}

func TestLayoutInvalid(t *testing.T) {
	m := hashChunked(t, disk(newRand(7), 8192), 1, newRand(8))
	for _, c := range []struct {
		name string
		mod  func(l *Layout)
	}{
		{"unsorted", func(l *Layout) { l.Units[1], l.Units[2] = l.Units[2], l.Units[1] }},
		{"duplicate", func(l *Layout) { l.Units[2].Name = l.Units[1].Name }},
		{"empty run", func(l *Layout) { l.Units[0].Blocks[1].Len = 0 }},
		{"overflow", func(l *Layout) { l.Units[0].Inodes[0] = Run{^uint64(0), 2} }},
		{"negative", func(l *Layout) { l.RootOffset = -1 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			m.Layout = sampleLayout()
			c.mod(m.Layout)
			if _, err := m.WriteTo(&bytes.Buffer{}); !errors.Is(err, ErrInvalid) {
				t.Errorf("WriteTo: got %v, want ErrInvalid", err)
			}
			// The same bytes, sealed past the writer's check, are corrupt.
			l := m.Layout
			m.Layout = nil
			b := encode(t, m)
			payload := append([]byte(nil), b[fileHeaderLen:len(b)-checksumLen]...)
			sec := l.encode()
			payload = append(payload, 0, 0, 0, sectionLayout, 0, 0, 0, 0)
			payload = append(payload, 0, 0, 0, 0, 0, 0, byte(len(sec)>>8), byte(len(sec)))
			payload = append(payload, sec...)
			if _, err := Read(bytes.NewReader(seal(payload))); !errors.Is(err, ErrCorrupt) {
				t.Errorf("Read: got %v, want ErrCorrupt", err)
			}
		})
	}
	// Truncations of a good section are corrupt.
	sec := sampleLayout().encode()
	for n := 0; n < len(sec); n++ {
		if _, err := decodeLayout(sec[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("layout truncated to %d of %d bytes: got %v, want ErrCorrupt", n, len(sec), err)
		}
	}
	if _, err := decodeLayout(append(sec, 0)); !errors.Is(err, ErrCorrupt) {
		t.Errorf("trailing byte: got %v, want ErrCorrupt", err)
	}
}
