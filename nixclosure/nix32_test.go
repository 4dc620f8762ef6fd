package nixclosure

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// Vectors from `nix-hash --type sha256|sha1|md5 --to-base32 HEX` (Nix 2.8).
var nix32Vectors = []struct{ hex, nix32 string }{
	{"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"},
	{"0000000000000000000000000000000000000000000000000000000000000001", "0080000000000000000000000000000000000000000000000000"},
	{"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"},
	{"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "1vydmf4nfi9307pwvaw9cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"},
	{"0123456789abcdef0123456789abcdef01234567", "cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"},
	{"0123456789abcdef0123456789abcdef", "7grnmqjrs54c0yzkdbi5kla8q1"},
	{"", ""},
}

func TestNix32(t *testing.T) {
	for _, v := range nix32Vectors {
		b, _ := hex.DecodeString(v.hex)
		if got := EncodeNix32(b); got != v.nix32 {
			t.Errorf("EncodeNix32(%s): got %s, want %s", v.hex, got, v.nix32)
		}
		got, err := DecodeNix32(v.nix32)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("DecodeNix32(%s): got %x, %v, want %s", v.nix32, got, err, v.hex)
		}
	}
}

// TestNix32AgainstNixHash compares with the real nix-hash on more inputs.
func TestNix32AgainstNixHash(t *testing.T) {
	nixHash := testutil.NeedTool(t, "nix-hash")[0]
	for _, s := range []string{"a", "nix", "nixvm-image", strings.Repeat("x", 1000)} {
		h := sha256Hex(s)
		out, err := exec.Command(nixHash, "--type", "sha256", "--to-base32", h).Output()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := hex.DecodeString(h)
		if got, want := EncodeNix32(b), strings.TrimSpace(string(out)); got != want {
			t.Errorf("EncodeNix32(%s): got %s, want %s (nix-hash)", h, got, want)
		}
	}
}

func TestDecodeNix32Errors(t *testing.T) {
	for _, s := range []string{
		"e", // not in the alphabet
		"0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7u",
		"2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", // 257 bits
		"0",   // no whole byte
		"000", // 15 bits: not the length of any byte count
	} {
		if _, err := DecodeNix32(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("DecodeNix32(%q): got %v, want ErrMalformed", s, err)
		}
	}
}

func TestParseHash(t *testing.T) {
	const hx = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	const n32 = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
	raw, _ := hex.DecodeString(hx)
	b64 := base64.StdEncoding.EncodeToString(raw)
	for _, in := range []string{hx, "sha256:" + hx, n32, n32[len("sha256:"):], "sha256-" + b64, "sha256:" + b64, b64} {
		got, err := NormaliseHash(in)
		if err != nil || got != n32 {
			t.Errorf("NormaliseHash(%q): got %q, %v, want %q", in, got, err, n32)
		}
		if got, err := Base16Hash(in); err != nil || got != "sha256:"+hx {
			t.Errorf("Base16Hash(%q): got %q, %v, want sha256:%s", in, got, err, hx)
		}
	}
	for _, in := range []string{"", "sha1:" + hx, "md5-" + b64, hx[:63], hx + "0", "sha256:" + hx[:62] + "zz", "sha256-" + hx} {
		if _, err := NormaliseHash(in); !errors.Is(err, ErrMalformed) {
			t.Errorf("NormaliseHash(%q): got %v, want ErrMalformed", in, err)
		}
	}
}

func FuzzNix32(f *testing.F) {
	for _, v := range nix32Vectors {
		b, _ := hex.DecodeString(v.hex)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s := EncodeNix32(b)
		if len(s) != Nix32Len(len(b)) {
			t.Fatalf("len: got %d, want %d", len(s), Nix32Len(len(b)))
		}
		got, err := DecodeNix32(s)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("round trip of %x: got %x, %v", b, got, err)
		}
	})
}
