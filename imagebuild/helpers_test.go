package imagebuild

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/nixclosure"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// entry is one file system object of a hand-made store path, relative to
// the path's root ("" is the root itself).
type entry struct {
	rel      string
	data     string // regular file content
	exec     bool
	dir      bool
	symlink  string // target
	hardlink string // another store path's entry: "<path name>/<rel>"
}

// storePathSpec is a hand-made store path: its name (after the hash) and
// contents, and the names of the paths it references.
type storePathSpec struct {
	name    string
	entries []entry
	refs    []string
}

// testStore is a closure made by the test: real directories in /nix/store
// (the only store directory an image has), not registered with Nix, and
// removed when the test ends. Their hashes are salted with the test's name
// and a per-process nonce, so concurrent test processes do not meet.
type testStore struct {
	dir      string
	closure  *nixclosure.Closure
	toplevel string
	byName   map[string]string // name -> store path
}

// storeHash is the hash part of a hand-made store path: fixed for a name
// and salt, so a golden image can be rebuilt anywhere.
func storeHash(salt, name string) string {
	s := sha256.Sum256([]byte("nixvm-image imagebuild test " + salt + "\x00" + name))
	return nixclosure.EncodeNix32(s[:20])
}

// text is n bytes of compressible, deterministic file data.
func text(seed string, n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "%s line %d: %x\n", seed, i, sha256.Sum256([]byte(fmt.Sprint(seed, i/7))))
	}
	return b.String()[:n]
}

// smallSpecs is the tiny closure most tests build: a library with a
// compressible file, a symlink, an empty file and directory and a file hard
// linked from another path; a shell whose bin/sh the image's /bin/sh
// follows; and a NixOS-shaped toplevel.
func smallSpecs() []storePathSpec {
	return []storePathSpec{
		{name: "lib-1.0", entries: []entry{
			{rel: "", dir: true},
			{rel: "lib", dir: true},
			{rel: "lib/libfoo.so", data: text("libfoo", 300<<10), exec: true},
			{rel: "lib/libfoo.so.1", symlink: "libfoo.so"},
			{rel: "lib/empty", data: ""},
			{rel: "share", dir: true},
			{rel: "share/empty-dir", dir: true},
			{rel: "share/data", data: text("shared", 9000)},
		}},
		{name: "bash-5.2", refs: []string{"lib-1.0"}, entries: []entry{
			{rel: "", dir: true},
			{rel: "bin", dir: true},
			{rel: "bin/bash", data: "#!/bin/false\n" + text("bash", 40<<10), exec: true},
			{rel: "bin/sh", symlink: "bash"},
		}},
		{name: "optimised", entries: []entry{
			{rel: "", dir: true},
			{rel: "data", hardlink: "lib-1.0/share/data"},
			{rel: "readme", data: "one file\n"},
		}},
		{name: "nixos-system-test", refs: []string{"bash-5.2", "lib-1.0", "optimised"}, entries: []entry{
			{rel: "", dir: true},
			{rel: "sw", dir: true},
			{rel: "sw/bin", dir: true},
			{rel: "sw/bin/sh", symlink: "@bash-5.2/bin/sh"},
			{rel: "nixos-version", data: "test\n"},
		}},
	}
}

// nonce keeps the store paths of concurrent test processes apart.
var nonce = fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())

// makeStore writes specs to /nix/store with hashes salted by the test's
// name and the process's nonce, and returns the closure; the last spec is
// the toplevel. A path that exists already (a name this test made before)
// is kept as it is, so two generations share their unchanged paths.
func makeStore(t testing.TB, specs []storePathSpec) *testStore {
	t.Helper()
	return makeStoreSalted(t, t.Name()+" "+nonce, specs)
}

// makeStoreSalted is makeStore with the hashes salted by salt alone: the
// same salt gives the same store paths on every machine.
func makeStoreSalted(t testing.TB, salt string, specs []storePathSpec) *testStore {
	t.Helper()
	testutil.NeedRoot(t)
	storeDir := nixclosure.DefaultStoreDir
	if err := os.MkdirAll(storeDir, 0o755); err != nil {
		testutil.Skip(t, "cannot make %s: %v", storeDir, err)
	}
	s := &testStore{dir: storeDir, byName: map[string]string{}}
	for _, sp := range specs {
		s.byName[sp.name] = storeDir + "/" + storeHash(salt, sp.name) + "-" + sp.name
	}
	resolve := func(target string) string {
		if name, rest, ok := strings.Cut(strings.TrimPrefix(target, "@"), "/"); ok && strings.HasPrefix(target, "@") {
			return s.byName[name] + "/" + rest
		}
		return target
	}
	for _, sp := range specs {
		root := s.byName[sp.name]
		if _, err := os.Lstat(root); err == nil {
			continue
		}
		for _, e := range sp.entries {
			p := filepath.Join(root, e.rel)
			var err error
			switch {
			case e.dir:
				err = os.Mkdir(p, 0o755)
			case e.symlink != "":
				err = os.Symlink(resolve(e.symlink), p)
			case e.hardlink != "":
				name, rel, _ := strings.Cut(e.hardlink, "/")
				err = os.Link(filepath.Join(s.byName[name], rel), p)
			default:
				mode := os.FileMode(0o644)
				if e.exec {
					mode = 0o755
				}
				err = os.WriteFile(p, []byte(e.data), mode)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	c := &nixclosure.Closure{StoreDir: storeDir}
	for _, sp := range specs {
		pi := nixclosure.PathInfo{Path: s.byName[sp.name], References: []string{}}
		for _, r := range sp.refs {
			pi.References = append(pi.References, s.byName[r])
		}
		c.Paths = append(c.Paths, pi)
	}
	c.Sort()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s.closure = c
	s.toplevel = s.byName[specs[len(specs)-1].name]
	t.Cleanup(func() { s.remove(t) })
	return s
}

// remove deletes the store paths (they may be read-only after a chmod).
func (s *testStore) remove(t testing.TB) {
	for _, p := range s.byName {
		filepath.Walk(p, func(q string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() {
				os.Chmod(q, 0o755)
			}
			return nil
		})
		if err := os.RemoveAll(p); err != nil {
			t.Errorf("removing %s: %v", p, err)
		}
	}
}

// withHashes returns a copy of the closure with every NAR hash and size
// filled in (as nix-store --dump-db gives them).
func (s *testStore) withHashes(t testing.TB) *nixclosure.Closure {
	t.Helper()
	c := &nixclosure.Closure{StoreDir: s.closure.StoreDir}
	for _, p := range s.closure.Paths {
		h, n, err := nixclosure.HashPath(p.Path)
		if err != nil {
			t.Fatal(err)
		}
		p.NarHash, p.NarSize = h, n
		c.Paths = append(c.Paths, p)
	}
	return c
}

// opts are build options for s writing to out, quiet unless -v.
func (s *testStore) opts(t testing.TB, out string) Options {
	o := Options{Closure: s.closure, Toplevel: s.toplevel, Output: out}
	if testing.Verbose() {
		o.Log = logWriter{t}
	}
	return o
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// mustBuild builds and fails the test on an error.
func mustBuild(t testing.TB, o Options) *Result {
	t.Helper()
	res, err := Build(context.Background(), o)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return res
}

// dirNames lists dir's entries, sorted, joined by commas.
func dirNames(t testing.TB, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}

func readManifest(t testing.TB, name string) *manifest.Manifest {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := manifest.Read(f)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return m
}

// qemuImgCheck runs qemu-img check on a qcow2 image.
func qemuImgCheck(t testing.TB, img string) {
	t.Helper()
	qemuImg := testutil.NeedTool(t, "qemu-img")[0]
	testutil.Run(t, qemuImg, "check", "-f", "qcow2", img)
}

// e2fsckRoot runs e2fsck -fn on the root file system of the raw disk laid
// out as plan, through a loop device over the partition.
func e2fsckRoot(t testing.TB, raw string, plan *partition.Plan) {
	t.Helper()
	e2fsck := testutil.NeedTool(t, "e2fsck")[0]
	dev := testutil.AttachLoop(t, raw, plan.Root.Start, plan.Root.Size)
	cmd := exec.Command(e2fsck, "-fn", dev)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s (root of %s): %v\n%s", dev, raw, err, out)
	}
}

// rawPlan is the plan of a built raw disk with the default layout options,
// recovered from its size as the builder's own reader does.
func rawPlan(t testing.TB, layout partition.Layout, raw string) *partition.Plan {
	t.Helper()
	fi, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	p0, err := partition.NewPlan(layout, 1<<30, 0)
	if err != nil {
		t.Fatal(err)
	}
	p, err := partition.NewPlan(layout, fi.Size()-(p0.DiskSize-p0.Root.Size), 0)
	if err != nil || p.DiskSize != fi.Size() {
		t.Fatalf("no %s plan gives a %d-byte disk (%v)", layout, fi.Size(), err)
	}
	return p
}

// qemuImgCompare compares a qcow2 image with a raw one, guest content only.
func qemuImgCompare(t testing.TB, qcow2, raw string) {
	t.Helper()
	qemuImg := testutil.NeedTool(t, "qemu-img")[0]
	out := testutil.Run(t, qemuImg, "compare", "-f", "qcow2", "-F", "raw", qcow2, raw)
	if !bytes.Contains(out, []byte("identical")) {
		t.Errorf("qemu-img compare: %s", out)
	}
}
