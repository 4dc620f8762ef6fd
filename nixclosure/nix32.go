package nixclosure

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

// nix32Alphabet is Nix's base-32 alphabet (src/libutil/hash.cc): digits and
// lower-case letters without e, o, u and t.
const nix32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

var nix32Index = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i := 0; i < len(nix32Alphabet); i++ {
		t[nix32Alphabet[i]] = int8(i)
	}
	return t
}()

// Nix32Len returns the length of the nix32 encoding of n bytes.
func Nix32Len(n int) int {
	if n == 0 {
		return 0
	}
	return (n*8-1)/5 + 1
}

// EncodeNix32 encodes b in Nix's base-32. Unlike RFC 4648 base32, Nix reads
// the bytes as one little-endian number and writes its 5-bit digits from the
// most significant down, so the output is the reverse of the usual bit order.
func EncodeNix32(b []byte) string {
	n := Nix32Len(len(b))
	out := make([]byte, 0, n)
	for k := n - 1; k >= 0; k-- {
		bit := k * 5
		i, j := bit/8, uint(bit%8)
		c := b[i] >> j
		if i+1 < len(b) {
			c |= b[i+1] << (8 - j)
		}
		out = append(out, nix32Alphabet[c&0x1f])
	}
	return string(out)
}

// DecodeNix32 decodes Nix's base-32. The decoded length is len(s)*5/8 bytes;
// a string whose unused high bits are not zero is an error.
func DecodeNix32(s string) ([]byte, error) {
	size := len(s) * 5 / 8
	if Nix32Len(size) != len(s) {
		return nil, fmt.Errorf("%w: nix32 string of %d characters is not the encoding of a whole number of bytes", ErrMalformed, len(s))
	}
	b := make([]byte, size)
	for n := 0; n < len(s); n++ {
		c := s[len(s)-n-1]
		d := nix32Index[c]
		if d < 0 {
			return nil, fmt.Errorf("%w: invalid nix32 character %q", ErrMalformed, c)
		}
		bit := n * 5
		i, j := bit/8, uint(bit%8)
		b[i] |= byte(d) << j
		hi := byte(d) >> (8 - j)
		if i+1 < size {
			b[i+1] |= hi
		} else if hi != 0 {
			return nil, fmt.Errorf("%w: nix32 string %q has bits beyond %d bytes", ErrMalformed, s, size)
		}
	}
	return b, nil
}

const sha256Size = 32

// ParseHash parses a sha256 hash in any form Nix accepts: bare or
// "sha256:"-prefixed base16, nix32 or base64, or SRI "sha256-<base64>".
// It returns the 32 raw bytes.
func ParseHash(s string) ([]byte, error) {
	rest := s
	sri := false
	switch {
	case strings.HasPrefix(s, "sha256:"):
		rest = s[len("sha256:"):]
	case strings.HasPrefix(s, "sha256-"):
		rest = s[len("sha256-"):]
		sri = true
	case strings.ContainsAny(s, ":-"):
		return nil, fmt.Errorf("%w: hash %q: only sha256 is supported", ErrMalformed, s)
	}
	var (
		b   []byte
		err error
	)
	switch {
	case sri || len(rest) == base64.StdEncoding.EncodedLen(sha256Size):
		b, err = base64.StdEncoding.Strict().DecodeString(rest)
	case len(rest) == hex.EncodedLen(sha256Size):
		b, err = hex.DecodeString(rest)
	case len(rest) == Nix32Len(sha256Size):
		b, err = DecodeNix32(rest)
	default:
		return nil, fmt.Errorf("%w: hash %q has %d characters, want 64 (base16), 52 (nix32) or 44 (base64)", ErrMalformed, s, len(rest))
	}
	if err != nil {
		return nil, fmt.Errorf("%w: hash %q: %v", ErrMalformed, s, err)
	}
	if len(b) != sha256Size {
		return nil, fmt.Errorf("%w: hash %q: got %d bytes, want %d", ErrMalformed, s, len(b), sha256Size)
	}
	return b, nil
}

// NormaliseHash returns a sha256 hash in the form "sha256:<nix32>".
func NormaliseHash(s string) (string, error) {
	b, err := ParseHash(s)
	if err != nil {
		return "", err
	}
	return "sha256:" + EncodeNix32(b), nil
}

// Base16Hash returns a sha256 hash in the form "sha256:<hex>", the form Nix
// stores in ValidPaths.hash.
func Base16Hash(s string) (string, error) {
	b, err := ParseHash(s)
	if err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(b), nil
}
