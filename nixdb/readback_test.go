package nixdb

import (
	"database/sql"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestReadBack writes synthetic paths and reads every row back with SQL.
func TestReadBack(t *testing.T) {
	paths := synthetic(300, 4)
	paths[0].Deriver, paths[0].NarSize, paths[0].Ca = "", 0, "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
	name := filepath.Join(t.TempDir(), "db.sqlite")
	if err := Write(name, paths, 1700000000); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", "file:"+name+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, p := range paths {
		var (
			id, regTime       int64
			hash              string
			deriver, ca, sigs sql.NullString
			narSize, ultimate sql.NullInt64
		)
		err := db.QueryRow(`select id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths where path = ?`, p.Path).
			Scan(&id, &hash, &regTime, &deriver, &narSize, &ultimate, &sigs, &ca)
		if err != nil {
			t.Fatalf("%s: %v", p.Path, err)
		}
		wantHash, _ := nixclosure.Base16Hash(p.NarHash)
		if id != PathID(p.Path) || hash != wantHash || regTime != 1700000000 ||
			deriver.String != p.Deriver || deriver.Valid != (p.Deriver != "") ||
			uint64(narSize.Int64) != p.NarSize || narSize.Valid != (p.NarSize != 0) ||
			ultimate.Valid || sigs.Valid || ca.String != p.Ca || ca.Valid != (p.Ca != "") {
			t.Errorf("%s: got id %d hash %s time %d deriver %v narSize %v ultimate %v sigs %v ca %v", p.Path, id, hash, regTime, deriver, narSize, ultimate, sigs, ca)
		}
		rows, err := db.Query(`select v.path from Refs join ValidPaths v on v.id = Refs.reference where Refs.referrer = ?`, id)
		if err != nil {
			t.Fatal(err)
		}
		var refs []string
		for rows.Next() {
			var r string
			rows.Scan(&r)
			refs = append(refs, r)
		}
		rows.Close()
		want := append([]string(nil), p.References...)
		sort.Strings(refs)
		sort.Strings(want)
		if strings.Join(refs, " ") != strings.Join(want, " ") {
			t.Errorf("%s: refs: got %q, want %q", p.Path, refs, want)
		}
	}
	var n int
	if err := db.QueryRow(`select count(*) from ValidPaths`).Scan(&n); err != nil || n != len(paths) {
		t.Errorf("count: got %d, %v, want %d", n, err, len(paths))
	}
	var fk int
	if err := db.QueryRow(`select count(*) from pragma_foreign_key_check`).Scan(&fk); err != nil || fk != 0 {
		t.Errorf("foreign_key_check: got %d violations, %v", fk, err)
	}
}

// TestFixtureGenerations measures the layout stability that matters for
// pushes: the databases of the small fixture and its next generation gen2
// (bash changed, hello added, new toplevel).
func TestFixtureGenerations(t *testing.T) {
	testutil.Short(t)
	var files []string
	var sizes []int
	for _, name := range []string{"small", "gen2"} {
		f := fixture.Build(t, name)
		c, err := nixclosure.FromToplevel(t.Context(), f.Toplevel)
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "db.sqlite")
		if err := Write(file, FromClosure(c), 1); err != nil {
			t.Fatal(err)
		}
		files = append(files, file)
		sizes = append(sizes, len(c.Paths))
	}
	changed, total := changedPages(t, files[0], files[1])
	t.Logf("small (%d paths) -> gen2 (%d paths): %d of %d database pages changed", sizes[0], sizes[1], changed, total)
	if changed == 0 {
		t.Error("the generations' databases are equal, want them to differ")
	}
}
