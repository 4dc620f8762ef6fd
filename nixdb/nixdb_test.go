package nixdb

import (
	"bytes"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// synthetic returns n made-up paths, each referencing up to 4 others.
func synthetic(n int, seed int64) []Path {
	rnd := rand.New(rand.NewSource(seed))
	const alpha = "0123456789abcdfghijklmnpqrsvwxyz"
	paths := make([]Path, n)
	for i := range paths {
		var h [32]byte
		for j := range h {
			h[j] = alpha[rnd.Intn(32)]
		}
		paths[i].Path = fmt.Sprintf("/nix/store/%s-pkg-%d", h[:], i)
		paths[i].Deriver = fmt.Sprintf("/nix/store/%s-pkg-%d.drv", h[:], i)
		sum := sha256.Sum256([]byte(paths[i].Path))
		paths[i].NarHash = "sha256:" + nixclosure.EncodeNix32(sum[:])
		paths[i].NarSize = uint64(rnd.Intn(1 << 20))
	}
	for i := range paths {
		seen := map[string]bool{}
		for k := rnd.Intn(5); k > 0; k-- {
			r := paths[rnd.Intn(n)].Path
			if !seen[r] {
				seen[r] = true
				paths[i].References = append(paths[i].References, r)
			}
		}
	}
	return paths
}

// TestDeterministic writes the same paths twice, in different orders and
// directories, and expects the same bytes; it also checks the SQLite header.
func TestDeterministic(t *testing.T) {
	paths := synthetic(500, 1)
	a := filepath.Join(t.TempDir(), "db.sqlite")
	b := filepath.Join(t.TempDir(), "db.sqlite")
	if err := Write(a, paths, 1); err != nil {
		t.Fatal(err)
	}
	rev := append([]Path(nil), paths...)
	sort.Slice(rev, func(i, j int) bool { return rev[i].Path > rev[j].Path })
	if err := Write(b, rev, 1); err != nil {
		t.Fatal(err)
	}
	if testutil.SHA256File(t, a) != testutil.SHA256File(t, b) {
		t.Fatal("two writes of the same paths differ")
	}
	for _, d := range []string{filepath.Dir(a), filepath.Dir(b)} {
		ents, _ := os.ReadDir(d)
		if len(ents) != 1 {
			t.Errorf("%s: got %d files, want only db.sqlite (no journal, WAL or temp file)", d, len(ents))
		}
	}
	hdr := make([]byte, 100)
	f, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	checks := []struct {
		name      string
		got, want uint64
	}{
		{"page size", uint64(binary.BigEndian.Uint16(hdr[16:])), PageSize},
		{"write version (1 = rollback journal, not WAL)", uint64(hdr[18]), 1},
		{"read version", uint64(hdr[19]), 1},
		{"page count", uint64(binary.BigEndian.Uint32(hdr[28:])), uint64(fi.Size() / PageSize)},
		{"freelist pages", uint64(binary.BigEndian.Uint32(hdr[36:])), 0},
		{"schema format", uint64(binary.BigEndian.Uint32(hdr[44:])), 4},
		{"text encoding (1 = UTF-8)", uint64(binary.BigEndian.Uint32(hdr[56:])), 1},
		{"auto-vacuum", uint64(binary.BigEndian.Uint32(hdr[52:])), 0},
	}
	if string(hdr[:16]) != "SQLite format 3\x00" {
		t.Errorf("magic: got %q", hdr[:16])
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("header %s: got %d, want %d", c.name, c.got, c.want)
		}
	}
	// A different registration time is a different database.
	c := filepath.Join(t.TempDir(), "db.sqlite")
	if err := Write(c, paths, 2); err != nil {
		t.Fatal(err)
	}
	if testutil.SHA256File(t, a) == testutil.SHA256File(t, c) {
		t.Error("registrationTime does not reach the file")
	}
}

// changedPages counts the 4 KiB pages that differ between two files.
func changedPages(t *testing.T, a, b string) (changed, total int) {
	x, _ := os.ReadFile(a)
	y, _ := os.ReadFile(b)
	n := max(len(x), len(y)) / PageSize
	for i := 0; i < n; i++ {
		lo, hi := i*PageSize, (i+1)*PageSize
		if hi > len(x) || hi > len(y) || !bytes.Equal(x[lo:hi], y[lo:hi]) {
			changed++
		}
	}
	return changed, n
}

// TestLocality measures how many pages change when one path is added to a
// 2000-path database: ids derived from store hashes keep every other row's
// id, so the change stays local in the tables and indices.
func TestLocality(t *testing.T) {
	paths := synthetic(2001, 2)
	extra := paths[1000]
	base := append(append([]Path(nil), paths[:1000]...), paths[1001:]...)
	for i := range base {
		refs := base[i].References[:0:0]
		for _, r := range base[i].References {
			if r != extra.Path {
				refs = append(refs, r)
			}
		}
		base[i].References = refs
	}
	a := filepath.Join(t.TempDir(), "db.sqlite")
	b := filepath.Join(t.TempDir(), "db.sqlite")
	if err := Write(a, base, 1); err != nil {
		t.Fatal(err)
	}
	plus := append(append([]Path(nil), base...), Path{Path: extra.Path, NarHash: extra.NarHash, NarSize: 1})
	if err := Write(b, plus, 1); err != nil {
		t.Fatal(err)
	}
	changed, total := changedPages(t, a, b)
	t.Logf("adding 1 path to 2000: %d of %d pages changed", changed, total)
	if changed > total/2 {
		t.Errorf("adding 1 path to 2000 changed %d of %d pages, want at most half", changed, total)
	}
}

func TestWriteErrors(t *testing.T) {
	ok := synthetic(3, 3)
	tests := []struct {
		name   string
		modify func(p []Path)
		err    error
	}{
		{"not a store path", func(p []Path) { p[0].Path = "/tmp/x" }, ErrInvalid},
		{"bad hash", func(p []Path) { p[0].NarHash = "sha256:zz" }, ErrInvalid},
		{"no hash", func(p []Path) { p[0].NarHash = "" }, ErrInvalid},
		{"bad deriver", func(p []Path) { p[0].Deriver = "x.drv" }, ErrInvalid},
		{"duplicate", func(p []Path) { p[1].Path = p[0].Path }, ErrDuplicate},
		{"dangling", func(p []Path) { p[0].References = []string{"/nix/store/00000000000000000000000000000000-x"} }, ErrDangling},
		{"duplicate reference", func(p []Path) { p[0].References = []string{p[1].Path, p[1].Path} }, ErrDuplicate},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := make([]Path, len(ok))
			for i := range ok {
				p[i] = ok[i]
				p[i].References = append([]string(nil), ok[i].References...)
			}
			tt.modify(p)
			dir := t.TempDir()
			if err := Write(filepath.Join(dir, "db.sqlite"), p, 1); !errors.Is(err, tt.err) {
				t.Fatalf("got %v, want %v", err, tt.err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("a failed Write left %d files behind", len(ents))
			}
		})
	}
	dir := t.TempDir()
	db := filepath.Join(dir, "db.sqlite")
	if err := os.WriteFile(db, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Write(db, ok, 1); !errors.Is(err, ErrExists) {
		t.Errorf("existing file: got %v, want ErrExists", err)
	}
	if b, _ := os.ReadFile(db); string(b) != "keep" {
		t.Errorf("existing file was changed")
	}
}

// TestNixAcceptsDatabase is the oracle test: real store paths copied into a
// fresh root R plus our database must satisfy the real Nix:
// `nix-store --store local?root=R --verify --check-contents`, the same
// --dump-db as the host store, and the same --references.
func TestNixAcceptsDatabase(t *testing.T) {
	testutil.NeedTool(t, "nix-build", "nix-store", "cp")
	testutil.NeedRoot(t)
	expr, _ := filepath.Abs("testdata/store.nix")
	top := strings.TrimSpace(string(testutil.Run(t, "nix-build", append([]string{expr, "--no-out-link", "-A", "top",
		"--argstr", "salt", fmt.Sprint(time.Now().UnixNano())}, testutil.NixOffline...)...)))
	c, err := nixclosure.FromToplevel(t.Context(), top)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Paths) != 4 {
		t.Fatalf("closure of %s: got %d paths, want 4", top, len(c.Paths))
	}
	checkWithNix(t, c, top)
}

// TestNixAcceptsSmallFixture does the same with the project's realistic test
// closure (testkit/fixture "small": ~75 MB, 19 paths).
func TestNixAcceptsSmallFixture(t *testing.T) {
	testutil.Short(t)
	testutil.NeedTool(t, "cp")
	f := fixture.Build(t, "small")
	c, err := nixclosure.FromToplevel(t.Context(), f.Toplevel)
	if err != nil {
		t.Fatal(err)
	}
	checkWithNix(t, c, f.Toplevel)
}

// checkWithNix copies the closure's paths from the host store into a fresh
// root R, writes our database there and checks it with the real Nix.
func checkWithNix(t *testing.T, c *nixclosure.Closure, top string) {
	root := t.TempDir()
	store := filepath.Join(root, "nix", "store")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range c.Paths {
		testutil.Run(t, "cp", "-a", p.Path, store+"/")
		names = append(names, p.Path)
	}
	dbDir := filepath.Join(root, "nix", "var", "nix", "db")
	if err := WriteDir(dbDir, FromClosure(c), 1); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dbDir, "schema")); string(b) != "10" {
		t.Errorf("schema file: got %q, want \"10\"", b)
	}
	storeURI := "local?root=" + root

	verify := func() ([]byte, error) {
		cmd := exec.Command("nix-store", "--store", storeURI, "--verify", "--check-contents")
		return cmd.CombinedOutput()
	}
	if out, err := verify(); err != nil || bytes.Contains(out, []byte("error")) || bytes.Contains(out, []byte("warning")) {
		t.Fatalf("nix-store --verify --check-contents: %v\n%s", err, out)
	}
	wantDump := testutil.Run(t, "nix-store", append([]string{"--dump-db"}, names...)...)
	gotDump := testutil.Run(t, "nix-store", append([]string{"--store", storeURI, "--dump-db"}, names...)...)
	if !bytes.Equal(gotDump, wantDump) {
		t.Errorf("--dump-db differs:\ngot\n%s\nwant\n%s", gotDump, wantDump)
	}
	for _, p := range names {
		want := testutil.Run(t, "nix-store", "-q", "--references", p)
		got := testutil.Run(t, "nix-store", "--store", storeURI, "-q", "--references", p)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: --references: got %q, want %q", p, got, want)
		}
		// The host store may hold more referrers (other closures).
		var wantRefs []string
		for _, q := range c.Paths {
			for _, r := range q.References {
				if r == p {
					wantRefs = append(wantRefs, q.Path)
				}
			}
		}
		gotRefs := strings.Fields(string(testutil.Run(t, "nix-store", "--store", storeURI, "-q", "--referrers", p)))
		sort.Strings(gotRefs)
		if strings.Join(gotRefs, " ") != strings.Join(wantRefs, " ") {
			t.Errorf("%s: --referrers: got %q, want %q", p, gotRefs, wantRefs)
		}
	}
	got := testutil.Run(t, "nix-store", "--store", storeURI, "-q", "--requisites", top)
	want := testutil.Run(t, "nix-store", "-q", "--requisites", top)
	if !bytes.Equal(got, want) {
		t.Errorf("--requisites: got %q, want %q", got, want)
	}

	// Rows as Nix itself writes them (hash as sha256:<base16>, NULLs), read
	// from the host's database; registrationTime and ultimate differ by
	// design (fixed time; not built on the image's machine).
	hostDB, err := sql.Open("sqlite", "file:/nix/var/nix/db/db.sqlite?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer hostDB.Close()
	ourDB, err := sql.Open("sqlite", "file:"+filepath.Join(dbDir, "db.sqlite")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer ourDB.Close()
	const q = `select path, hash, coalesce(deriver, 'NULL'), coalesce(narSize, 'NULL'), coalesce(sigs, 'NULL'), coalesce(ca, 'NULL'),
		coalesce((select group_concat(r.path, ' ') from (select v.path from Refs join ValidPaths v on v.id = Refs.reference
			where Refs.referrer = ValidPaths.id order by v.path) r), '')
		from ValidPaths where path = ?`
	for _, p := range names {
		var h, o [7]string
		if err := hostDB.QueryRow(q, p).Scan(&h[0], &h[1], &h[2], &h[3], &h[4], &h[5], &h[6]); err != nil {
			t.Fatalf("host db: %v", err)
		}
		if err := ourDB.QueryRow(q, p).Scan(&o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6]); err != nil {
			t.Fatalf("our db: %v", err)
		}
		if h != o {
			t.Errorf("ValidPaths row:\ngot  %q\nwant %q", o, h)
		}
	}
	var ic string
	if err := ourDB.QueryRow("pragma integrity_check").Scan(&ic); err != nil || ic != "ok" {
		t.Errorf("integrity_check: got %q, %v", ic, err)
	}

	// Nix can register new paths on top (autoincrement past our ids).
	extra := filepath.Join(t.TempDir(), "extra")
	if err := os.WriteFile(extra, []byte(fmt.Sprint(time.Now().UnixNano())), 0o644); err != nil {
		t.Fatal(err)
	}
	added := strings.TrimSpace(string(testutil.Run(t, "nix-store", "--store", storeURI, "--add", extra)))
	if got := testutil.Run(t, "nix-store", "--store", storeURI, "-q", "--hash", added); len(got) == 0 {
		t.Errorf("%s not valid after --add", added)
	}
	if out, err := verify(); err != nil {
		t.Fatalf("nix-store --verify after --add: %v\n%s", err, out)
	}

	// The check can fail: corrupt one file and Nix must notice.
	victim := filepath.Join(store, filepath.Base(c.Paths[0].Path))
	if err := filepath.Walk(victim, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			os.Chmod(p, 0o644)
			return os.WriteFile(p, []byte("corrupted"), 0o444)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if out, err := verify(); err == nil && !bytes.Contains(out, []byte("modified")) {
		t.Errorf("nix-store --verify --check-contents accepted a corrupted path:\n%s", out)
	}
}
