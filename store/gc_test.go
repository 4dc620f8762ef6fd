package store

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
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
	// top (scanned) -> mid (not scanned, named relatively) -> gens[1].
	mid := filepath.Join(t.TempDir(), "mid.qcow2")
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", gens[1], "-F", "qcow2", mid)
	top := filepath.Join(scan, "sub", "top.qcow2")
	os.MkdirAll(filepath.Dir(top), 0o755)
	rel, _ := filepath.Rel(filepath.Dir(top), mid)
	run(t, qimg, "create", "-q", "-f", "qcow2", "-b", rel, "-F", "qcow2", top)

	o := GCOptions{Names: []string{"baseline"}, Keep: 2, ScanDirs: []string{scan}, DryRun: true}
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
	if _, err := s.GC(context.Background(), o); !errors.Is(err, ErrBusy) {
		t.Errorf("gc while a push held the lock: got %v, want ErrBusy", err)
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
	failing := func(context.Context) ([]string, error) { return nil, errors.New("virsh broke") }
	if _, err := s.GC(context.Background(), GCOptions{Disks: failing}); err == nil || !strings.Contains(err.Error(), "virsh broke") {
		t.Fatalf("gc with a failing disk list: got %v", err)
	}
	if left, _ := s.List("baseline"); len(left) != 3 {
		t.Fatalf("a failed gc removed generations: %d left", len(left))
	}
	disks := func(context.Context) ([]string, error) { return []string{ov, "/nonexistent/disk"}, nil }
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
