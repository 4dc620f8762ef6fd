// Package nixdb writes the Nix store database of an image:
// /nix/var/nix/db/db.sqlite at schema version 10 (Nix 2.x up to at least
// 2.8) and the `schema` file next to it, so that the image's Nix knows every
// store path in it as valid, with its NAR hash, NAR size, deriver and
// references, as if it had been registered with `nix-store --load-db`.
//
// The schema is Nix's src/libstore/schema.sql as Nix 2.8 creates it
// (ValidPaths, Refs, DerivationOutputs, their indices and the DeleteSelfRefs
// trigger). Rows are what Nix's registerValidPath writes: hash as
// "sha256:<base16>", NULL for an unknown deriver, narSize 0, and for
// ultimate and sigs; ca only when given.
//
// Output is deterministic: the same paths and registration time give the
// same bytes. Paths are inserted in sorted order, the page size is fixed at
// 4096, no journal or WAL is left behind (the file is in rollback-journal
// mode; Nix switches it to WAL when it first opens it read-write), and each
// path's row id is derived from its store hash (the first 12 nix32 digits, an
// order-preserving 60-bit number), so a path keeps its id, and its Refs rows,
// from one image to the next.
//
// Limits: DerivationOutputs stays empty (closures of outputs carry no .drv
// files; Nix fills it when a .drv is registered); signatures are not stored;
// the ca-derivations Realisations table (an experimental feature) is absent.
package nixdb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nixvm-image/nixvm-image/nixclosure"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// SchemaVersion is the Nix store schema version written to the schema file.
const SchemaVersion = 10

// SchemaFileContent is the exact content of /nix/var/nix/db/schema (no
// newline, as Nix writes it).
const SchemaFileContent = "10"

// PageSize is the SQLite page size of the database, the same as a Nix-created
// one and the image's 4 KiB block size.
const PageSize = 4096

// Errors.
var (
	ErrExists    = errors.New("nixdb: database file already exists")
	ErrInvalid   = errors.New("nixdb: invalid path")
	ErrDuplicate = errors.New("nixdb: duplicate path")
	ErrDangling  = errors.New("nixdb: reference to a path not in the database")
)

// Path is one valid store path to register.
type Path struct {
	Path       string   // /nix/store/<hash>-<name>
	NarHash    string   // sha256 in any form Nix accepts (hex, nix32, SRI); stored as sha256:<base16>
	Deriver    string   // "" when unknown
	NarSize    uint64   // 0 when unknown
	References []string // store paths, each in the set; may include Path itself
	Ca         string   // content-address assertion, "" for input-addressed paths
}

// FromClosure converts a closure for Write.
func FromClosure(c *nixclosure.Closure) []Path {
	out := make([]Path, 0, len(c.Paths))
	for _, p := range c.Paths {
		out = append(out, Path{Path: p.Path, NarHash: p.NarHash, Deriver: p.Deriver, NarSize: p.NarSize, References: p.References})
	}
	return out
}

// schema is Nix's schema.sql (Nix 2.8), the statements Nix runs on a fresh
// store. The indices come after the data (see Write).
const schemaTables = `
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
`

const schemaIndices = `
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to ` + "`" + `on
-- delete restrict' on the ` + "`" + `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
`

// row is a validated path with its id.
type row struct {
	Path
	id   int64
	hash string // sha256:<base16>
}

// PathID returns the ValidPaths id Write gives a store path: its first 12
// hash digits read as a base-32 number, so ids sort like paths and do not
// depend on the other paths. (Write bumps an id that collides with the
// previous path's.)
func PathID(storePath string) int64 {
	base := storePath[strings.LastIndexByte(storePath, '/')+1:]
	var id int64
	for i := 0; i < 12; i++ {
		id = id<<5 | int64(strings.IndexByte("0123456789abcdfghijklmnpqrsvwxyz", base[i]))
	}
	return id + 1 // ids start at 1
}

func prepare(paths []Path) ([]row, error) {
	rows := make([]row, len(paths))
	for i, p := range paths {
		rows[i].Path = p
		if err := nixclosure.CheckStorePath(nixclosure.DefaultStoreDir, p.Path); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		h, err := nixclosure.Base16Hash(p.NarHash)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: narHash: %v", ErrInvalid, p.Path, err)
		}
		rows[i].hash = h
		if p.Deriver != "" {
			if err := nixclosure.CheckStorePath(nixclosure.DefaultStoreDir, p.Deriver); err != nil {
				return nil, fmt.Errorf("%w: %s: deriver: %v", ErrInvalid, p.Path, err)
			}
		}
		if p.NarSize > 1<<63-1 {
			return nil, fmt.Errorf("%w: %s: narSize %d does not fit SQLite's integer", ErrInvalid, p.Path, p.NarSize)
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Path.Path < rows[j].Path.Path })
	for i := range rows {
		rows[i].id = PathID(rows[i].Path.Path)
		if i > 0 {
			if rows[i].Path.Path == rows[i-1].Path.Path {
				return nil, fmt.Errorf("%w: %s", ErrDuplicate, rows[i].Path.Path)
			}
			if rows[i].id <= rows[i-1].id {
				rows[i].id = rows[i-1].id + 1
			}
		}
	}
	return rows, nil
}

// Write creates the database file dbPath. It fails with ErrExists when the
// file exists. The file is written under a temporary name in the same
// directory, synced and renamed, so a failure leaves nothing behind.
// registrationTime (Unix seconds) is the registrationTime of every path.
func Write(dbPath string, paths []Path, registrationTime int64) (err error) {
	rows, err := prepare(paths)
	if err != nil {
		return err
	}
	if err := checkDangling(rows); err != nil {
		return err
	}
	if _, err := os.Lstat(dbPath); err == nil {
		return fmt.Errorf("%w: %s", ErrExists, dbPath)
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}

	dir := filepath.Dir(dbPath)
	tmp, err := os.CreateTemp(dir, ".db.sqlite.tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	if err := tmp.Close(); err != nil {
		os.Remove(tmpName)
		return err
	}
	defer func() {
		if err != nil {
			os.Remove(tmpName)
			os.Remove(tmpName + "-journal")
		}
	}()
	if err := os.Remove(tmpName); err != nil { // SQLite creates it
		return err
	}
	if err := fill(tmpName, rows, registrationTime); err != nil {
		return fmt.Errorf("nixdb: writing %s: %w", dbPath, err)
	}
	if err := syncFile(tmpName); err != nil {
		return err
	}
	// Link, not rename, so an existing dbPath (created meanwhile) is not
	// replaced.
	if err := os.Link(tmpName, dbPath); err != nil {
		if errors.Is(err, os.ErrExist) {
			err = fmt.Errorf("%w: %s", ErrExists, dbPath)
		}
		return err
	}
	return os.Remove(tmpName)
}

// checkDangling fails with ErrDangling when a row references a path that
// is not a row.
func checkDangling(rows []row) error {
	ids := make(map[string]int64, len(rows))
	for _, r := range rows {
		ids[r.Path.Path] = r.id
	}
	for _, r := range rows {
		for _, ref := range r.References {
			if _, ok := ids[ref]; !ok {
				return fmt.Errorf("%w: %s references %s", ErrDangling, r.Path.Path, ref)
			}
		}
	}
	return nil
}

// syncFile makes the file at name mode 0644 and syncs it.
func syncFile(name string) error {
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// WriteDir writes dir/db.sqlite and dir/schema, the content of a store's
// /nix/var/nix/db, creating dir if needed.
func WriteDir(dir string, paths []Path, registrationTime int64) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := Write(filepath.Join(dir, "db.sqlite"), paths, registrationTime); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "schema"), []byte(SchemaFileContent), 0o644)
}

func fill(name string, rows []row, registrationTime int64) (err error) {
	ctx := context.Background()
	db, err := sql.Open("sqlite", "file:"+name)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := db.Close(); err == nil {
			err = cerr
		}
	}()
	db.SetMaxOpenConns(1)
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	for _, p := range []string{
		fmt.Sprintf("pragma page_size = %d", PageSize),
		"pragma journal_mode = off", // nothing to roll back to: a failure removes the file
		"pragma synchronous = off",  // Write syncs the file once at the end
		"pragma auto_vacuum = none",
		"pragma encoding = 'UTF-8'",
	} {
		if _, err := conn.ExecContext(ctx, p); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, schemaTables); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	if err := insertPaths(ctx, tx, rows, registrationTime); err != nil {
		return err
	}
	if err := insertRefs(ctx, tx, rows); err != nil {
		return err
	}
	// Indices after the data: SQLite then builds them sorted and packed.
	if _, err := tx.ExecContext(ctx, schemaIndices); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	return tx.Commit()
}

// insertPaths inserts a ValidPaths row per path.
func insertPaths(ctx context.Context, tx *sql.Tx, rows []row, registrationTime int64) error {
	ins, err := tx.PrepareContext(ctx, `insert into ValidPaths (id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, null, null, ?)`)
	if err != nil {
		return err
	}
	defer ins.Close()
	nullIf := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	for _, r := range rows {
		var size any
		if r.NarSize != 0 {
			size = int64(r.NarSize)
		}
		if _, err := ins.ExecContext(ctx, r.id, r.Path.Path, r.hash, registrationTime, nullIf(r.Deriver), size, nullIf(r.Ca)); err != nil {
			return fmt.Errorf("%s: %w", r.Path.Path, err)
		}
	}
	return nil
}

// insertRefs inserts the Refs rows, each path's references by ascending id.
func insertRefs(ctx context.Context, tx *sql.Tx, rows []row) error {
	ref, err := tx.PrepareContext(ctx, `insert into Refs (referrer, reference) values (?, ?)`)
	if err != nil {
		return err
	}
	defer ref.Close()
	byPath := make(map[string]int64, len(rows))
	for _, r := range rows {
		byPath[r.Path.Path] = r.id
	}
	for _, r := range rows {
		refIDs := make([]int64, 0, len(r.References))
		for _, p := range r.References {
			refIDs = append(refIDs, byPath[p])
		}
		sort.Slice(refIDs, func(i, j int) bool { return refIDs[i] < refIDs[j] })
		for i, id := range refIDs {
			if i > 0 && id == refIDs[i-1] {
				return fmt.Errorf("%w: %s lists a reference twice", ErrDuplicate, r.Path.Path)
			}
			if _, err := ref.ExecContext(ctx, r.id, id); err != nil {
				return fmt.Errorf("%s: reference: %w", r.Path.Path, err)
			}
		}
	}
	return nil
}
