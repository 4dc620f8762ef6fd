package publish

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// reseal replaces the trailing checksum of an object whose body was edited.
func reseal(b []byte) []byte {
	body := bytes.Clone(b[:len(b)-32])
	s := sum(body)
	return append(body, s[:]...)
}

func hashN(n int) []manifest.Hash {
	hs := make([]manifest.Hash, n)
	for i := range hs {
		hs[i] = manifest.HashBlock([]byte{byte(i), byte(i >> 8), 1})
	}
	return hs
}

func sampleIndex() *PackIndex {
	p := &PackIndex{}
	hs := hashN(5)
	p.addFrame(100, hs[:3])
	p.addFrame(50, hs[3:])
	return p
}

func TestDecodeIndexRefuses(t *testing.T) {
	good := sampleIndex().Encode()
	if p, err := DecodeIndex(good); err != nil || p.Hashes() != 5 || p.PackSize != 150 {
		t.Fatalf("good index: %v", err)
	}
	edit := func(f func(b []byte) []byte) []byte { return reseal(f(bytes.Clone(good))) }
	cases := map[string][]byte{
		"empty":          nil,
		"truncated":      good[:len(good)-40],
		"bad checksum":   append(bytes.Clone(good[:len(good)-1]), good[len(good)-1]^1),
		"bad magic":      edit(func(b []byte) []byte { b[0] = 'X'; return b }),
		"newer version":  edit(func(b []byte) []byte { b[11] = 2; return b }),
		"flags":          edit(func(b []byte) []byte { b[15] = 1; return b }),
		"pack too small": edit(func(b []byte) []byte { binary.BigEndian.PutUint64(b[16:], 120); return b }),
		"pack too large": edit(func(b []byte) []byte { binary.BigEndian.PutUint64(b[16:], 1<<40); return b }),
		"frame count":    edit(func(b []byte) []byte { binary.BigEndian.PutUint64(b[56:], 1<<50); return b }),
		"zero blocks":    edit(func(b []byte) []byte { b[65] = 0; return b }),
		"trailing bytes": reseal(append(bytes.Clone(good[:len(good)-32]), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7)),
	}
	zi := &PackIndex{}
	zi.addFrame(10, []manifest.Hash{manifest.ZeroHash()})
	cases["zero block hash"] = zi.Encode()
	li := &PackIndex{}
	li.addFrame(1<<20, hashN(1))
	cases["frame longer than its blocks"] = li.Encode()
	for name, b := range cases {
		if _, err := DecodeIndex(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: got %v, want ErrFormat", name, err)
		}
	}
}

// recipeFixture is a pack index of two frames of four blocks, and the
// blocks, digest and full recipe of an image: a zero block, then blocks 2
// to 6 of the pack.
func recipeFixture() (*PackIndex, []manifest.Hash, ID, *Recipe) {
	hs := hashN(8)
	idx := &PackIndex{}
	idx.addFrame(10, hs[:4])
	idx.addFrame(10, hs[4:])
	blocks := append([]manifest.Hash{manifest.ZeroHash()}, hs[2:7]...)
	d := ID(manifest.ComputeDigest(blocks))
	return idx, blocks, d, &Recipe{Digest: d, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opZero, N: 1}, {Kind: opPack, Start: 2, N: 5}}}
}

func TestRecipeRefuses(t *testing.T) {
	idx, blocks, d, good := recipeFixture()
	r, err := DecodeRecipe(good.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if m, err := r.Blocks(nil, []*PackIndex{idx}); err != nil || m.Digest != [32]byte(d) {
		t.Fatalf("good recipe: %v", err)
	}
	bad := map[string]*Recipe{
		"runs overrun":     {Digest: d, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opZero, N: 7}}},
		"runs short":       {Digest: d, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opZero, N: 5}}},
		"pack out of list": {Digest: d, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opPack, Pack: 1, N: 6}}},
		"unknown op":       {Digest: d, VirtualSize: 6 * BlockSize, Ops: []Op{{Kind: 9, N: 6}}},
		"self forward":     {Digest: d, VirtualSize: 6 * BlockSize, Ops: []Op{{Kind: opZero, N: 1}, {Kind: opSelf, Start: 1, N: 5}}},
		"empty run":        {Digest: d, VirtualSize: 6 * BlockSize, Ops: []Op{{Kind: opZero, N: 0}, {Kind: opZero, N: 6}}},
		"size zero":        {Digest: d, VirtualSize: 0, Ops: nil},
		"size huge":        {Digest: d, VirtualSize: 1 << 50, Ops: []Op{{Kind: opZero, N: 1}}},
	}
	for name, r := range bad {
		if _, err := DecodeRecipe(r.Encode()); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: got %v, want ErrFormat", name, err)
		}
	}
	// Structurally fine, but pointing outside the pack or the base, or
	// rebuilding another digest.
	expand := map[string]*Recipe{
		"pack run past the pack": {Digest: d, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opZero, N: 1}, {Kind: opPack, Start: 4, N: 5}}},
		"base run without base":  {Digest: d, VirtualSize: 6 * BlockSize, Ops: []Op{{Kind: opBase, Start: 0, N: 6}}},
		"wrong digest":           {Digest: ID{9}, VirtualSize: 6 * BlockSize, Packs: []ID{{1}}, Ops: []Op{{Kind: opZero, N: 1}, {Kind: opPack, Start: 2, N: 5}}},
	}
	for name, r := range expand {
		dr, err := DecodeRecipe(r.Encode())
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		packs := make([]*PackIndex, len(dr.Packs))
		for i := range packs {
			packs[i] = idx
		}
		if _, err := dr.Blocks(nil, packs); !errors.Is(err, ErrFormat) && !errors.Is(err, ErrVerify) {
			t.Errorf("%s: got %v, want ErrFormat or ErrVerify", name, err)
		}
	}
	based := &Recipe{Digest: d, Base: ID{3}, VirtualSize: 6 * BlockSize, Ops: []Op{{Kind: opBase, Start: 2, N: 6}}}
	dr, _ := DecodeRecipe(based.Encode())
	if _, err := dr.Blocks(blocks, nil); !errors.Is(err, ErrFormat) {
		t.Errorf("base run past the base: got %v", err)
	}
}

func TestPointerRefuses(t *testing.T) {
	p := &Pointer{Name: "base", Digest: ID{1}, VirtualSize: 4096, Published: time.Unix(1e9, 0), From: []ID{{2}}}
	good := string(p.Encode(nil))
	if q, err := ParsePointer([]byte(good)); err != nil || q.Digest != p.Digest || len(q.From) != 1 {
		t.Fatalf("good pointer: %v", err)
	}
	cases := map[string]string{
		"escaping name":  strings.Replace(good, "name base", "name ../../etc", 1),
		"slash in name":  strings.Replace(good, "name base", "name a/b", 1),
		"dot name":       strings.Replace(good, "name base", "name ..", 1),
		"short digest":   strings.Replace(good, "digest 01", "digest 1", 1),
		"upper digest":   strings.Replace(good, "digest 01", "digest 0A", 1),
		"negative size":  strings.Replace(good, "size 4096", "size -1", 1),
		"huge size":      strings.Replace(good, "size 4096", "size 99999999999999999", 1),
		"unknown line":   good + "evil yes\n",
		"no newline":     strings.TrimSuffix(good, "\n"),
		"other header":   strings.Replace(good, "latest 1", "latest 2", 1),
		"bad signature":  good + "signature ed25519 AAAA BBBB\n",
		"missing fields": "nixvm-image latest 1\nname base\n",
	}
	for name, b := range cases {
		if _, err := ParsePointer([]byte(b)); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: got %v, want ErrFormat", name, err)
		}
	}
}

func TestSignedPointer(t *testing.T) {
	pub, sec, _ := ed25519.GenerateKey(nil)
	other, _, _ := ed25519.GenerateKey(nil)
	p := &Pointer{Name: "base", Digest: ID{1}, VirtualSize: 4096, Published: time.Unix(1e9, 0)}
	signed := p.Encode(sec)
	q, err := ParsePointer(signed)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Verify([]ed25519.PublicKey{other, pub}); err != nil {
		t.Fatalf("trusted signature refused: %v", err)
	}
	if err := q.Verify([]ed25519.PublicKey{other}); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("foreign key: %v", err)
	}
	u, _ := ParsePointer(p.Encode(nil))
	if err := u.Verify([]ed25519.PublicKey{pub}); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("unsigned: %v", err)
	}
	// Any change to the signed lines breaks the signature.
	tampered := bytes.Replace(signed, []byte("digest 01"), []byte("digest 02"), 1)
	q, err = ParsePointer(tampered)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Verify([]ed25519.PublicKey{pub}); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("tampered: %v", err)
	}
}

// TestPullTrust: with --trust, a generation published by someone else
// (signed by another key, or not at all) is refused and nothing changes.
func TestPullTrust(t *testing.T) {
	pub := t.TempDir()
	srv := startNginx(t, pub)
	kp, ks, _ := ed25519.GenerateKey(nil)
	_, evil, _ := ed25519.GenerateKey(nil)
	g1 := testImage(51, 2<<20)
	g2 := rebuild(g1, 52, 64<<10)
	host := t.TempDir()
	publishT(t, pub, "img", g1, PublishOptions{SignKey: ks})
	if _, err := pullT(t, srv.URL, host, "img", PullOptions{Trust: []ed25519.PublicKey{kp}}); err != nil {
		t.Fatal(err)
	}
	for name, key := range map[string]ed25519.PrivateKey{"unsigned": nil, "foreign": evil} {
		publishT(t, pub, "img", g2, PublishOptions{SignKey: key})
		before := storeState(t, host)
		_, err := pullT(t, srv.URL, host, "img", PullOptions{Trust: []ed25519.PublicKey{kp}})
		if !errors.Is(err, ErrUntrusted) {
			t.Fatalf("%s: got %v, want ErrUntrusted", name, err)
		}
		t.Logf("%s: %v", name, err)
		if after := storeState(t, host); after != before {
			t.Fatalf("%s: store changed", name)
		}
	}
	checkCurrent(t, host, "img", g1)
}

// TestBadNames: names and keys that would leave the store or the base.
func TestBadNames(t *testing.T) {
	for _, n := range []string{"", "..", ".hidden", "a/b", "../etc", strings.Repeat("x", 65), "a b"} {
		if ValidName(n) == nil {
			t.Errorf("name %q accepted", n)
		}
		if _, err := Pull(context.Background(), PullOptions{Name: n, Source: &dirTarget{dir: t.TempDir()}}); err == nil {
			t.Errorf("pull of %q accepted", n)
		}
	}
	for _, k := range []string{"", "/etc/passwd", "../x", "a/../../b", "a//b", "a/.x", "a\\b", "a%2f"} {
		if validKey(k) == nil {
			t.Errorf("key %q accepted", k)
		}
	}
	if _, err := (&dirTarget{dir: t.TempDir()}).Get(context.Background(), "../../etc/passwd", 100); err == nil {
		t.Error("Get escaped the directory")
	}
}

// TestInstallRefusesUnverified: the store checks every block again.
func TestInstallRefusesUnverified(t *testing.T) {
	host := t.TempDir()
	img := testImage(61, 1<<20)
	m := imageOf(img)
	bad := bytes.Clone(img)
	bad[5000] ^= 1
	s := NewHostStore(host)
	unlock, err := s.Lock("img")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	err = s.Install("img", &manifest.Manifest{VirtualSize: m.VirtualSize, Blocks: m.Blocks, Digest: m.Digest}, bytes.NewReader(bad), "")
	if !errors.Is(err, ErrVerify) {
		t.Fatalf("got %v, want ErrVerify", err)
	}
	ents, _ := os.ReadDir(filepath.Join(host, "img"))
	for _, e := range ents {
		if e.Name() != ".pull" && e.Name() != ".lock" {
			t.Errorf("left %s", e.Name())
		}
	}
}

// TestPullRefusesRollback: a replayed older pointer (validly signed) is
// refused unless AllowOlder; nothing changes.
func TestPullRefusesRollback(t *testing.T) {
	pub := t.TempDir()
	g1 := testImage(81, 1<<20)
	g2 := rebuild(g1, 82, 16<<10)
	host := t.TempDir()
	url := "file://" + pub
	publishT(t, pub, "img", g1, PublishOptions{Now: func() time.Time { return time.Unix(1e9, 0) }})
	old := mustRead(t, filepath.Join(pub, "img", "latest"))
	if _, err := pullT(t, url, host, "img", PullOptions{}); err != nil {
		t.Fatal(err)
	}
	publishT(t, pub, "img", g2, PublishOptions{Now: func() time.Time { return time.Unix(2e9, 0) }})
	if _, err := pullT(t, url, host, "img", PullOptions{}); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(pub, "img", "latest"), old)
	before := storeState(t, host)
	if _, err := pullT(t, url, host, "img", PullOptions{}); !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("replayed pointer: %v", err)
	}
	if storeState(t, host) != before {
		t.Fatal("store changed")
	}
	if _, err := pullT(t, url, host, "img", PullOptions{AllowOlder: true}); err != nil {
		t.Fatal(err)
	}
	checkCurrent(t, host, "img", g1)
}
