package publish

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Pointer is NAME/latest: which generation of NAME is newest and which
// recipes rebuild its block list. A text file:
//
//	nixvm-image latest 1
//	name NAME
//	digest HEX
//	size BYTES
//	published RFC3339 time
//	from HEX            one per delta recipe (recipes/DIGEST.from-HEX)
//	signature ed25519 KEY SIG   optional, last: base64 public key and
//	                    signature over every byte before this line
//
// recipes/DIGEST.full always exists.
type Pointer struct {
	Name        string
	Digest      ID
	VirtualSize int64
	Published   time.Time
	From        []ID
	// Set by ParsePointer when signed.
	SignedBy  ed25519.PublicKey
	signature []byte
	signed    []byte
}

const pointerHeader = "nixvm-image latest 1"

// maxDeltas bounds the from lines of a pointer.
const maxDeltas = 64

func (p *Pointer) body() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\nname %s\ndigest %s\nsize %d\npublished %s\n", pointerHeader, p.Name, p.Digest, p.VirtualSize, p.Published.UTC().Format(time.RFC3339))
	for _, f := range p.From {
		fmt.Fprintf(&b, "from %s\n", f)
	}
	return []byte(b.String())
}

// Encode returns the pointer's bytes, signed with key when key is not nil.
func (p *Pointer) Encode(key ed25519.PrivateKey) []byte {
	b := p.body()
	if key != nil {
		sig := ed25519.Sign(key, b)
		pub := key.Public().(ed25519.PublicKey)
		b = fmt.Appendf(b, "signature ed25519 %s %s\n", base64.StdEncoding.EncodeToString(pub), base64.StdEncoding.EncodeToString(sig))
	}
	return b
}

// ParsePointer parses NAME/latest strictly: every line known, in order.
func ParsePointer(b []byte) (*Pointer, error) {
	if len(b) > MaxPointerSize {
		return nil, formatErr(pointerWhat, "%d bytes, at most %d allowed", len(b), MaxPointerSize)
	}
	if len(b) == 0 || b[len(b)-1] != '\n' {
		return nil, formatErr(pointerWhat, "not newline-terminated text")
	}
	lines := pointerLines(strings.Split(string(b[:len(b)-1]), "\n"))
	if lines[0] != pointerHeader {
		return nil, formatErr(pointerWhat, "first line %q, want %q", truncate(lines[0], 60), pointerHeader)
	}
	p := &Pointer{}
	if err := lines.parseFields(p); err != nil {
		return nil, err
	}
	i, err := lines.parseFrom(p, 5)
	if err != nil {
		return nil, err
	}
	if i < len(lines) {
		if err := lines.parseSignature(p, i); err != nil {
			return nil, err
		}
		p.signed = b[:len(b)-len(lines[i])-1]
		i++
	}
	if i != len(lines) {
		return nil, formatErr(pointerWhat, "line %d: %q after the signature", i+1, truncate(lines[i], 60))
	}
	return p, nil
}

const pointerWhat = "NAME/latest"

// pointerLines are the lines of NAME/latest, without their newlines.
type pointerLines []string

// field returns the value of line i, which must start with key.
func (lines pointerLines) field(i int, key string) (string, error) {
	if i >= len(lines) {
		return "", formatErr(pointerWhat, "no %s line", key)
	}
	v, ok := strings.CutPrefix(lines[i], key+" ")
	if !ok {
		return "", formatErr(pointerWhat, "line %d: %q, want %s", i+1, truncate(lines[i], 60), key)
	}
	return v, nil
}

// parseFields reads lines 2 to 5: name, digest, size and published.
func (lines pointerLines) parseFields(p *Pointer) error {
	var err error
	var v string
	if p.Name, err = lines.field(1, "name"); err != nil {
		return err
	}
	if err := ValidName(p.Name); err != nil {
		return formatErr(pointerWhat, "%v", err)
	}
	if v, err = lines.field(2, "digest"); err != nil {
		return err
	}
	if p.Digest, err = ParseID(v); err != nil {
		return err
	}
	if v, err = lines.field(3, "size"); err != nil {
		return err
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 || n > maxVirtualSize {
		return formatErr(pointerWhat, "size %q out of range 1 to %d", truncate(v, 30), maxVirtualSize)
	}
	p.VirtualSize = n
	if v, err = lines.field(4, "published"); err != nil {
		return err
	}
	if p.Published, err = time.Parse(time.RFC3339, v); err != nil {
		return formatErr(pointerWhat, "published %q: %v", truncate(v, 40), err)
	}
	return nil
}

// parseFrom reads the from lines starting at line i and returns the
// index of the first line after them.
func (lines pointerLines) parseFrom(p *Pointer, i int) (int, error) {
	for ; i < len(lines) && strings.HasPrefix(lines[i], "from "); i++ {
		if len(p.From) == maxDeltas {
			return 0, formatErr(pointerWhat, "more than %d from lines", maxDeltas)
		}
		id, err := ParseID(lines[i][5:])
		if err != nil {
			return 0, err
		}
		p.From = append(p.From, id)
	}
	return i, nil
}

// parseSignature reads the signature line i.
func (lines pointerLines) parseSignature(p *Pointer, i int) error {
	v, err := lines.field(i, "signature ed25519")
	if err != nil {
		return err
	}
	k, s, ok := strings.Cut(v, " ")
	pub, err1 := base64.StdEncoding.DecodeString(k)
	sig, err2 := base64.StdEncoding.DecodeString(s)
	if !ok || err1 != nil || err2 != nil || len(pub) != ed25519.PublicKeySize || len(sig) != ed25519.SignatureSize {
		return formatErr(pointerWhat, "line %d: malformed signature", i+1)
	}
	p.SignedBy, p.signature = pub, sig
	return nil
}

// ErrUntrusted reports a pointer that is not signed by a trusted key.
var ErrUntrusted = errors.New("publish: untrusted generation")

// Verify checks the pointer's signature against the trusted keys; with no
// trusted keys every pointer passes.
func (p *Pointer) Verify(trusted []ed25519.PublicKey) error {
	if len(trusted) == 0 {
		return nil
	}
	if p.SignedBy == nil {
		return fmt.Errorf("%w: %s/latest (%s) is not signed, and --trust requires a signature from one of %d keys (publish with --sign-key)", ErrUntrusted, p.Name, p.Digest, len(trusted))
	}
	for _, k := range trusted {
		if bytes.Equal(k, p.SignedBy) {
			if !ed25519.Verify(k, p.signed, p.signature) {
				return fmt.Errorf("%w: %s/latest: bad signature by trusted key %s: the pointer was altered after signing", ErrUntrusted, p.Name, base64.StdEncoding.EncodeToString(k))
			}
			return nil
		}
	}
	return fmt.Errorf("%w: %s/latest is signed by %s, which is not among the %d keys given with --trust", ErrUntrusted, p.Name, base64.StdEncoding.EncodeToString(p.SignedBy), len(trusted))
}

// ValidName checks an image name as the host store does: 1 to 64 bytes of
// [A-Za-z0-9._-], not starting with a dot, so it never escapes a directory.
func ValidName(name string) error {
	if name == "" || len(name) > 64 || name[0] == '.' {
		return fmt.Errorf("publish: bad image name %q: want 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", truncate(name, 80))
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("publish: bad image name %q: want 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'", truncate(name, 80))
		}
	}
	return nil
}

// Key files: one line "nixvm-image ed25519 secret|public BASE64".

// GenerateKey writes a new key pair to secretPath (mode 0600) and
// secretPath.pub.
func GenerateKey(secretPath string) (ed25519.PublicKey, error) {
	pub, sec, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(secretPath, []byte("nixvm-image ed25519 secret "+base64.StdEncoding.EncodeToString(sec.Seed())+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(secretPath+".pub", []byte(FormatPublicKey(pub)+"\n"), 0o644); err != nil {
		return nil, err
	}
	return pub, nil
}

// FormatPublicKey is the one-line form --trust accepts.
func FormatPublicKey(pub ed25519.PublicKey) string {
	return "nixvm-image ed25519 public " + base64.StdEncoding.EncodeToString(pub)
}

// LoadSecretKey reads a secret key file written by GenerateKey.
func LoadSecretKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	v, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "nixvm-image ed25519 secret ")
	seed, err := base64.StdEncoding.DecodeString(v)
	if !ok || err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("%s: not a nixvm-image secret key (want one line \"nixvm-image ed25519 secret BASE64\"; make one with nixvm-image publish --gen-key FILE)", path)
	}
	return ed25519.NewKeyFromSeed(seed), nil
}

// ParsePublicKey accepts "nixvm-image ed25519 public BASE64", the bare
// base64 key, or the path of a file holding either.
func ParsePublicKey(s string) (ed25519.PublicKey, error) {
	v := strings.TrimSpace(s)
	if b, err := os.ReadFile(s); err == nil {
		v = strings.TrimSpace(string(b))
	}
	v = strings.TrimPrefix(v, "nixvm-image ed25519 public ")
	k, err := base64.StdEncoding.DecodeString(v)
	if err != nil || len(k) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("trusted key %q: want \"nixvm-image ed25519 public BASE64\" (the .pub file publish --gen-key wrote), the base64 key, or a file holding it", truncate(s, 80))
	}
	return ed25519.PublicKey(k), nil
}
