package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"golang.org/x/sys/unix"
)

func run(t testing.TB, argv ...string) {
	t.Helper()
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

// checkKept checks GC decisions: want maps kept paths to their reasons;
// every other generation must be removed (and gone, unless dry).
func checkKept(t testing.TB, ds []Decision, want map[string]string) {
	t.Helper()
	seen := 0
	for _, d := range ds {
		reason, keep := want[d.Gen.Path]
		switch {
		case keep && (d.Remove || d.Reason != reason):
			t.Errorf("%s: got remove=%v reason %q, want kept: %s", d.Gen.Path, d.Remove, d.Reason, reason)
		case !keep && !d.Remove:
			t.Errorf("%s: kept (%s), want removed", d.Gen.Path, d.Reason)
		}
		if keep {
			seen++
			if _, err := os.Stat(d.Gen.Path); err != nil {
				t.Errorf("kept generation: %v", err)
			}
		}
	}
	if seen != len(want) {
		t.Errorf("got %d kept of the wanted %d: %+v", seen, len(want), ds)
	}
}

// TestGC: keep counts the current one, a symlink (the compatibility link)
// and an overlay chain reaching a generation through another overlay keep
// it, dry run removes nothing, and removal takes the name's lock.
func TestGC(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	s := newStore(t)
	var gens []string
	for i := range 5 {
		gens = append(gens, put(t, s, "baseline", testImage(int64(10+i), 2*mib)).Path)
	}
	other := put(t, s, "other", testImage(20, 2*mib)).Path
	scan := t.TempDir()
	if err := os.Symlink(gens[0], filepath.Join(scan, "baseline.qcow2")); err != nil {
		t.Fatal(err)
	}
	// top (scanned) -> mid (in another scanned directory, named
	// relatively) -> gens[1]. A chain is followed only through files in the
	// store and the scanned directories (issue 12 item 1).
	scan2 := t.TempDir()
	mid := filepath.Join(scan2, "mid.qcow2")
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", gens[1], "-F", "qcow2", mid)
	top := filepath.Join(scan, "sub", "top.qcow2")
	os.MkdirAll(filepath.Dir(top), 0o755)
	rel, _ := filepath.Rel(filepath.Dir(top), mid)
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", rel, "-F", "qcow2", top)

	o := GCOptions{Names: []string{"baseline"}, Keep: 2, ScanDirs: []string{scan, scan2}, DryRun: true}
	rep, err := s.GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	ds := rep.Decisions
	want := map[string]string{gens[4]: "current", gens[3]: "newest 2", gens[1]: "referenced", gens[0]: "referenced"}
	for _, d := range ds {
		if _, err := os.Stat(d.Gen.Path); err != nil {
			t.Errorf("dry run removed %s", d.Gen.Path)
		}
	}
	if len(ds) != 5 {
		t.Fatalf("got %d decisions, want 5", len(ds))
	}
	l, err := s.Lock("baseline")
	if err != nil {
		t.Fatal(err)
	}
	o.DryRun = false
	rep, err = s.GC(context.Background(), o)
	if err != nil || len(rep.Decisions) != 0 || len(rep.Skipped) != 1 || !errors.Is(rep.Skipped[0].Err, ErrBusy) {
		t.Errorf("gc while a push held the lock: got %+v, %v; want baseline skipped as busy", rep, err)
	}
	l.Unlock()
	rep, err = s.GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	checkKept(t, rep.Decisions, want)
	if _, err := os.Stat(gens[2] + manifestExt); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("removed generation's manifest left: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("gc of baseline touched another name: %v", err)
	}
	// The store still lists what is left, current first.
	left, err := s.List("baseline")
	if err != nil || len(left) != 4 || left[0].Path != gens[4] {
		t.Errorf("after gc: %v, %+v", err, left)
	}
}

// TestGCDisks: disks listed by the Disks function keep what they use; its
// failure stops gc before it removes anything; Keep 0 keeps the current one.
func TestGCDisks(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	s := newStore(t)
	g1 := put(t, s, "baseline", testImage(1, mib))
	g2 := put(t, s, "baseline", testImage(2, mib))
	g3 := put(t, s, "baseline", testImage(3, mib))
	ov := filepath.Join(t.TempDir(), "vm.qcow2")
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", g1.Path, "-F", "qcow2", ov)
	failing := func(context.Context) ([]Disk, error) { return nil, errors.New("virsh broke") }
	if _, err := s.GC(context.Background(), GCOptions{Disks: failing}); err == nil || !strings.Contains(err.Error(), "virsh broke") {
		t.Fatalf("gc with a failing disk list: got %v", err)
	}
	if left, _ := s.List("baseline"); len(left) != 3 {
		t.Fatalf("a failed gc removed generations: %d left", len(left))
	}
	disks := func(context.Context) ([]Disk, error) { return []Disk{{Path: ov}, {Path: "/nonexistent/disk"}}, nil }
	rep, err := s.GC(context.Background(), GCOptions{Disks: disks})
	if err != nil {
		t.Fatal(err)
	}
	ds := rep.Decisions
	checkKept(t, ds, map[string]string{g1.Path: "referenced", g3.Path: "current"})
	for _, d := range ds {
		if d.Gen.Path == g1.Path && (len(d.Users) != 1 || d.Users[0] != ov) {
			t.Errorf("users of %s: got %q, want [%s]", g1.Path, d.Users, ov)
		}
	}
	if _, err := os.Stat(g2.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unused generation %s left: %v", g2.Path, err)
	}
	if _, err := s.GC(context.Background(), GCOptions{Keep: -1}); err == nil {
		t.Error("gc with Keep -1 ran")
	}
}

// TestGCLeftovers: gc removes, under each name's lock, what crashes and
// abandoned pushes leave (issue 12 item 8): a partial receive older than
// GCOptions.PartialAge or of a digest the store now holds, an index whose
// image is gone, an image without an index that no disk uses, temporary
// files; it keeps a fresh partial (a push may resume it) and an indexless
// image a disk uses. A dry run removes nothing.
func TestGCLeftovers(t *testing.T) {
	s := newStore(t)
	ga := put(t, s, "a", testImage(1, mib))
	put(t, s, "b", testImage(2, mib))
	write := func(name, path string, age time.Duration) string {
		t.Helper()
		p := filepath.Join(s.nameDir(name), path)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte("leftover"), 0o600); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-age)
		os.Chtimes(p, old, old)
		return p
	}
	hx := func(b byte) string { return digestHex([32]byte{b}) }
	stale := []string{
		write("a", ".partial/"+hx(1)+".raw", 48*time.Hour), // abandoned two days ago
		write("a", ".partial/"+hx(1)+".hashes", 48*time.Hour),
		write("a", ".partial/"+hx(1)+".progress", 47*time.Hour),
		write("a", genFile([32]byte{2})+manifestExt, 0), // index whose image is gone
		write("a", genFile([32]byte{3}), 0),             // image without index, unused
		write("a", ".tmp-123.qcow2", time.Hour),         // an install cut short
		write("a", "."+genFile([32]byte{4})+manifestExt+".tmp-99", time.Hour),
		write("a", ".tmp-current", time.Hour),
	}
	// The partial of a digest "a" holds now has nothing to resume; "b"'s
	// partial of the same digest is fresh, and b does not hold it.
	stale = append(stale, write("a", ".partial/"+digestHex(ga.Digest)+".raw", 0))
	fresh := write("b", ".partial/"+digestHex(ga.Digest)+".raw", 0)
	used := write("a", genFile([32]byte{5}), 0)
	scan := t.TempDir()
	os.Symlink(used, filepath.Join(scan, "link.qcow2"))
	keep := []string{fresh, used, ga.Path, ga.Path + manifestExt, filepath.Join(s.nameDir("a"), "current")}

	o := GCOptions{ScanDirs: []string{scan}, DryRun: true}
	rep, err := s.GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range append(stale, keep...) {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("dry run removed %s", p)
		}
	}
	o.DryRun = false
	rep, err = s.GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	var junk []string
	for _, j := range rep.Junk {
		junk = append(junk, j.Path)
	}
	for _, p := range stale {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("leftover %s not removed: %v", p, err)
		}
	}
	if len(junk) < len(stale)-2 { // a partial's files may be reported as one
		t.Errorf("report lists %d leftovers, want about %d: %q", len(junk), len(stale), junk)
	}
	for _, p := range keep {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("gc removed %s, which it must keep: %v", p, err)
		}
	}
	if list, _ := s.List("a"); len(list) != 1 || list[0].Path != ga.Path {
		t.Errorf("generations of a after gc: %+v", list)
	}
}

// TestGCSkipsBusyNames: a name whose lock a push holds, or one a disk is
// being made from (a Use), is skipped and reported; gc goes on with the
// others (issue 12 item 5).
func TestGCSkipsBusyNames(t *testing.T) {
	s := newStore(t)
	var old []Generation
	for _, name := range []string{"a", "b", "c"} {
		old = append(old, put(t, s, name, testImage(1, mib)))
		put(t, s, name, testImage(2, mib))
	}
	l, err := s.Lock("a")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	u, err := s.Use(context.Background(), "b")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Release()
	rep, err := s.GC(context.Background(), GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var skipped []string
	for _, sk := range rep.Skipped {
		if !errors.Is(sk.Err, ErrBusy) {
			t.Errorf("skip of %s: %v, want ErrBusy", sk.Name, sk.Err)
		}
		skipped = append(skipped, sk.Name)
	}
	if strings.Join(skipped, " ") != "a b" {
		t.Errorf("skipped %q, want a and b", skipped)
	}
	for i, g := range old {
		_, err := os.Stat(g.Path)
		if gone := errors.Is(err, os.ErrNotExist); gone != (i == 2) {
			t.Errorf("old generation of %s: removed %v, want %v", g.Name, gone, i == 2)
		}
	}
}

// TestUse: a Use waits while gc holds the name and gives up with ErrBusy
// when its context ends; it sees the current generation; a name the store
// lacks fails with ErrNoCurrent.
func TestUse(t *testing.T) {
	s := newStore(t)
	g := put(t, s, "baseline", testImage(1, mib))
	l, err := s.Lock("baseline")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.excludeUses(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := s.Use(ctx, "baseline"); !errors.Is(err, ErrBusy) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Use while gc holds the name: got %v, want ErrBusy after the deadline", err)
	}
	done := make(chan error, 1)
	go func() {
		u, err := s.Use(context.Background(), "baseline")
		if err == nil {
			var cur Generation
			cur, err = u.Current()
			if err == nil && cur.Path != g.Path {
				err = fmt.Errorf("current %s, want %s", cur.Path, g.Path)
			}
			err = errors.Join(err, u.Release())
		}
		done <- err
	}()
	time.Sleep(3 * useRetry)
	l.Unlock()
	if err := <-done; err != nil {
		t.Errorf("Use after gc let go: %v", err)
	}
	u1, err := s.Use(context.Background(), "baseline")
	if err != nil {
		t.Fatal(err)
	}
	u2, err := s.Use(context.Background(), "baseline")
	if err != nil {
		t.Errorf("a second Use beside the first: %v", err)
	} else {
		u2.Release()
	}
	u1.Release()
	if _, err := s.Use(context.Background(), "nothere"); !errors.Is(err, ErrNoCurrent) {
		t.Errorf("Use of a missing name: got %v, want ErrNoCurrent", err)
	}
}

// fakeHeader is a qcow2 header naming backing as its backing file, as a
// guest can write to sector 0 of its raw disk.
func fakeHeader(backing string) []byte {
	b := make([]byte, 4096)
	copy(b, "QFI\xfb")
	binary.BigEndian.PutUint32(b[4:], 3)
	binary.BigEndian.PutUint64(b[8:], 512)
	binary.BigEndian.PutUint32(b[16:], uint32(len(backing)))
	copy(b[512:], backing)
	return b
}

// TestGCGuestHeaders (issue 12 item 1): raw disks whose first sector a
// guest forged into a qcow2 header must not make gc open what it names: a
// FIFO in a scanned directory (gc would hang), a file outside the store
// (here an overlay that reaches a generation: following it keeps that
// generation), and, for a disk libvirt says is raw, a generation itself.
// gc runs under a timeout. Before the fix gc hung on the FIFO.
func TestGCGuestHeaders(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	s := newStore(t)
	g1 := put(t, s, "baseline", testImage(1, mib))
	g2 := put(t, s, "baseline", testImage(2, mib))
	put(t, s, "baseline", testImage(3, mib))
	scan, outside := t.TempDir(), t.TempDir()
	fifo := filepath.Join(scan, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(outside, "elsewhere.qcow2")
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", g1.Path, "-F", "qcow2", ov)
	for name, target := range map[string]string{"to-fifo.raw": fifo, "to-outside.raw": ov} {
		if err := os.WriteFile(filepath.Join(scan, name), fakeHeader(target), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	rawDisk := filepath.Join(outside, "libvirt-raw.img")
	if err := os.WriteFile(rawDisk, fakeHeader(g2.Path), 0o600); err != nil {
		t.Fatal(err)
	}
	disks := func(context.Context) ([]Disk, error) { return []Disk{{Path: rawDisk, Format: "raw"}}, nil }
	type result struct {
		rep *GCReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := s.GC(context.Background(), GCOptions{ScanDirs: []string{scan}, Disks: disks})
		done <- result{rep, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(20 * time.Second):
		// Unblock the hung open so the test process can end.
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			f.Close()
		}
		t.Fatal("gc hung on a FIFO named by a raw disk's forged header")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	for _, d := range r.rep.Decisions {
		if !d.Gen.Current && !d.Remove {
			t.Errorf("%s kept (%s, users %q): a forged header was followed", d.Gen.Path, d.Reason, d.Users)
		}
	}
}
