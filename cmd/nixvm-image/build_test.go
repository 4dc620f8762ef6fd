package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/nixvm-image/nixvm-image/partition"
	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// TestMain lets the test binary act as the CLI (NIXVM_IMAGE_RUN_MAIN=1), so
// tests can run it as a subprocess with its own umask and environment
// without building a separate binary.
// testProcessDir holds what the tests of this process share (the static
// binary); TestMain removes it, so nothing is left in the temp dir.
var testProcessDir string

func TestMain(m *testing.M) {
	if os.Getenv("NIXVM_IMAGE_RUN_MAIN") == "1" {
		main()
	}
	var err error
	if testProcessDir, err = os.MkdirTemp("", "nixvm-image-test-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(testProcessDir)
	os.Exit(code)
}

// run runs the CLI in-process.
func run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = Context{Stdout: &out, Stderr: &errb, Args: args}.Execute(context.Background())
	return out.String(), errb.String(), code
}

// partitionFile copies one partition of a raw disk into its own sparse file,
// so tools that take no offset (e2fsck, fsck.vfat) can check it.
func partitionFile(t *testing.T, disk string, e partition.Extent) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "part.img")
	cmd := exec.Command("dd", "if="+disk, "of="+out, "bs=1M", "conv=sparse",
		fmt.Sprintf("skip=%d", e.Start/partition.MiB), fmt.Sprintf("count=%d", e.Size/partition.MiB), "status=none")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, b)
	}
	return out
}

// mustRun runs a reference tool and returns its output as text.
func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	return string(testutil.Run(t, name, args...))
}

func sha256File(t *testing.T, name string) string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestBuildFixture builds the fixture closure in every layout and checks
// the result with the reference tools.
func TestBuildFixture(t *testing.T) {
	tools := testutil.NeedTool(t, "qemu-img", "sfdisk", "sgdisk", "e2fsck", "fsck.vfat", "nix-store")
	qemuImg, sfdisk, sgdisk, e2fsck, fsckVfat, nixStore := tools[0], tools[1], tools[2], tools[3], tools[4], tools[5]
	fx := nixfixture.Build(t, "small")
	for _, layout := range partition.Layouts {
		t.Run(string(layout), func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			raw := filepath.Join(dir, "img.raw")
			for _, args := range [][]string{
				{"build", "--quiet", "--no-bootloader", "--toplevel", fx.Toplevel, "--layout", string(layout), "-o", img},
				{"build", "--quiet", "--no-bootloader", "--toplevel", fx.Toplevel, "--layout", string(layout), "--format", "raw", "-o", raw},
			} {
				if _, stderr, code := run(t, args...); code != 0 {
					t.Fatalf("%v: exit %d: %s", args, code, stderr)
				}
			}
			mustRun(t, qemuImg, "check", img)
			mustRun(t, qemuImg, "compare", "-f", "qcow2", "-F", "raw", img, raw)
			var info struct {
				Format         string `json:"format"`
				VirtualSize    int64  `json:"virtual-size"`
				FormatSpecific struct {
					Data struct {
						CompressionType string `json:"compression-type"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			json.Unmarshal([]byte(mustRun(t, qemuImg, "info", "--output=json", img)), &info)
			if info.Format != "qcow2" || info.FormatSpecific.Data.CompressionType != "zstd" {
				t.Errorf("qemu-img info: got format %q compression %q, want qcow2 zstd", info.Format, info.FormatSpecific.Data.CompressionType)
			}
			// The manifest names the disk content, whatever the container.
			if a, b := readManifestDigest(t, img), readManifestDigest(t, raw); a != b {
				t.Errorf("manifest digests of the qcow2 and raw builds differ: %s vs %s", a, b)
			}

			var table sfdiskJSON
			json.Unmarshal([]byte(mustRun(t, sfdisk, "--json", raw)), &table)
			fi, _ := os.Stat(raw)
			plan := planFromTable(t, layout, table, fi.Size())
			if layout.GPT() {
				if out := mustRun(t, sgdisk, "-v", raw); !strings.Contains(out, "No problems found") {
					t.Errorf("sgdisk -v: %s", out)
				}
			}
			if layout.HasESP() {
				mustRun(t, fsckVfat, "-n", partitionFile(t, raw, plan.ESP))
			}
			rootImg := partitionFile(t, raw, plan.Root)
			if out, err := exec.Command(e2fsck, "-fn", rootImg).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck -fn: %v\n%s", err, out)
			}
			if layout == partition.Legacy {
				checkStore(t, nixStore, fx, rootImg)
			}
		})
	}
}

func readManifestDigest(t *testing.T, img string) string {
	t.Helper()
	b, err := os.ReadFile(img + ".manifest")
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

type sfdiskJSON struct {
	PartitionTable struct {
		Label      string `json:"label"`
		Partitions []struct {
			Start int64  `json:"start"`
			Size  int64  `json:"size"`
			Type  string `json:"type"`
			Name  string `json:"name"`
		} `json:"partitions"`
	} `json:"partitiontable"`
}

// planFromTable checks what sfdisk read against the layout and returns the
// partition extents it found.
func planFromTable(t *testing.T, layout partition.Layout, table sfdiskJSON, diskSize int64) partition.Plan {
	t.Helper()
	wantLabel := map[bool]string{false: "dos", true: "gpt"}[layout.GPT()]
	if table.PartitionTable.Label != wantLabel {
		t.Fatalf("table label: got %q, want %q", table.PartitionTable.Label, wantLabel)
	}
	parts := table.PartitionTable.Partitions
	want := 1
	if layout.HasESP() {
		want++
	}
	if layout.HasBIOSBoot() {
		want++
	}
	if len(parts) != want {
		t.Fatalf("partitions: got %d, want %d", len(parts), want)
	}
	ext := func(i int) partition.Extent {
		return partition.Extent{Start: parts[i].Start * 512, Size: parts[i].Size * 512}
	}
	p := partition.Plan{Layout: layout, DiskSize: diskSize, Root: ext(len(parts) - 1)}
	if p.Root.Start%partition.MiB != 0 {
		t.Errorf("root partition starts at %d, not 1 MiB aligned", p.Root.Start)
	}
	if layout == partition.Legacy && p.Root.Start != partition.MiB {
		t.Errorf("legacy root starts at %d, want 1 MiB (the seed's layout)", p.Root.Start)
	}
	if layout.HasESP() {
		p.ESP = ext(len(parts) - 2)
		if p.ESP.Size < partition.MinESPSize {
			t.Errorf("ESP is %d bytes, want at least 512 MiB", p.ESP.Size)
		}
	}
	return p
}

// checkStore mounts the root file system and checks the store with Nix
// itself: contents, database, and the files outside the store.
func checkStore(t *testing.T, nixStore string, fx *nixfixture.Fixture, rootImg string) {
	testutil.NeedRoot(t)
	mnt := t.TempDir()
	dev := testutil.AttachLoop(t, rootImg, 0, 0)
	testutil.Mount(t, dev, mnt)

	// /nix/store is root:nixbld (30000) 1775; checked before Nix runs, which
	// re-owns it to this host's nixbld group.
	st := statT(t, mnt+"/nix/store")
	if st.Uid != 0 || st.Gid != 30000 || st.Mode&07777 != 01775 {
		t.Errorf("/nix/store: got uid %d gid %d mode %o, want 0 30000 1775", st.Uid, st.Gid, st.Mode&07777)
	}

	store := "local?root=" + mnt
	mustRun(t, nixStore, "--store", store, "--verify", "--check-contents")

	// The database holds exactly the closure, with the host's hashes,
	// sizes, derivers and references.
	want := mustRun(t, nixStore, append([]string{"--dump-db"}, fx.Paths...)...)
	got := mustRun(t, nixStore, "--store", store, "--dump-db")
	if got != want {
		t.Errorf("image database differs from the host's:\n got: %.400s\nwant: %.400s", got, want)
	}
	// Every path's NAR equals the host's.
	for _, p := range fx.Paths {
		a := sha256.Sum256([]byte(mustRun(t, nixStore, "--dump", p)))
		b := sha256.Sum256([]byte(mustRun(t, nixStore, "--dump", mnt+p)))
		if a != b {
			t.Errorf("nix-store --dump %s differs between host and image", p)
		}
	}
	if l, _ := os.Readlink(mnt + "/nix/var/nix/profiles/system"); l != "system-1-link" {
		t.Errorf("profiles/system -> %q, want system-1-link", l)
	}
	if l, _ := os.Readlink(mnt + "/nix/var/nix/profiles/system-1-link"); l != fx.Toplevel {
		t.Errorf("profiles/system-1-link -> %q, want %s", l, fx.Toplevel)
	}
	if _, err := os.Stat(mnt + "/etc/NIXOS"); err != nil {
		t.Errorf("/etc/NIXOS: %v", err)
	}
	if l, err := os.Readlink(mnt + "/bin/sh"); err != nil || !strings.HasPrefix(l, "/nix/") {
		t.Errorf("/bin/sh -> %q (%v), want a link into the store", l, err)
	}
	// Hard links made by nix-store --optimise survive.
	links := 0
	filepath.Walk(mnt+"/nix/store", func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && fi.Sys().(*syscall.Stat_t).Nlink > 1 {
			links++
		}
		if err == nil && fi.Mode().IsRegular() {
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 || (st.Mode&0o777 != 0o444 && st.Mode&0o777 != 0o555) || st.Mtim.Sec != 1 {
				t.Errorf("%s: uid %d gid %d mode %o mtime %d, want root:root 0444/0555 mtime 1", p, st.Uid, st.Gid, st.Mode&0o7777, st.Mtim.Sec)
				return filepath.SkipAll
			}
		}
		return nil
	})
	if links == 0 {
		t.Errorf("no hard-linked files in the image; the fixture's nix-store --optimise links were lost")
	}
}

func statT(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

// TestBuildClosureForms builds from every closure description form Nix
// writes. Forms that carry the same facts give the same image: the graph,
// closureInfo registration and JSON forms carry no deriver, while
// nix-store --dump-db carries the same as --toplevel.
func TestBuildClosureForms(t *testing.T) {
	testutil.NeedTool(t, "nix-store")
	fx := nixfixture.Build(t, "small")
	dir := t.TempDir()
	var digests []string
	top := filepath.Join(dir, "toplevel.qcow2")
	if _, stderr, code := run(t, "build", "--quiet", "--no-bootloader", "--toplevel", fx.Toplevel, "-o", top); code != 0 {
		t.Fatalf("toplevel: exit %d: %s", code, stderr)
	}
	for _, form := range []struct{ name, file string }{
		{"graph", fx.GraphFile},
		{"dump-db", fx.DumpDBFile},
		{"registration", fx.RegistrationFile},
		{"json", fx.JSONFile},
	} {
		img := filepath.Join(dir, form.name+".qcow2")
		if _, stderr, code := run(t, "build", "--quiet", "--no-bootloader", "--closure", form.file, "-o", img); code != 0 {
			t.Fatalf("%s: exit %d: %s", form.name, code, stderr)
		}
		digests = append(digests, form.name+" "+sha256File(t, img))
	}
	sum := func(i int) string { return strings.Fields(digests[i])[1] }
	if sum(0) != sum(2) || sum(0) != sum(3) {
		t.Errorf("graph, registration and JSON forms give different images:\n%s", strings.Join(digests, "\n"))
	}
	if sum(1) != sha256File(t, top) {
		t.Errorf("--closure of nix-store --dump-db and --toplevel give different images")
	}
	// --toplevel through a GC root (./result) is the same system.
	link := filepath.Join(dir, "result")
	if err := os.Symlink(fx.Toplevel, link); err != nil {
		t.Fatal(err)
	}
	viaLink := filepath.Join(dir, "via-link.qcow2")
	if _, stderr, code := run(t, "build", "--quiet", "--no-bootloader", "--toplevel", link, "-o", viaLink); code != 0 {
		t.Fatalf("--toplevel through a symlink: exit %d: %s", code, stderr)
	}
	if sha256File(t, viaLink) != sha256File(t, top) {
		t.Errorf("--toplevel through a symlink gives a different image")
	}
}

// TestDeterministic builds twice as separate processes with a different
// temp dir, umask, time zone and worker count: the bytes must be equal.
func TestDeterministic(t *testing.T) {
	testutil.NeedTool(t, "nix-store")
	fx := nixfixture.Build(t, "small")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var sums []string
	for i, env := range []struct{ umask, tz, jobs string }{
		{"022", "UTC", "1"},
		{"077", "America/New_York", "2"},
	} {
		dir := t.TempDir()
		out := filepath.Join(dir, fmt.Sprintf("img%d.qcow2", i))
		cmd := exec.Command("/bin/sh", "-c", "umask "+env.umask+" && exec \"$0\" \"$@\"", self,
			"build", "--quiet", "--no-bootloader", "--toplevel", fx.Toplevel, "--layout", "hybrid", "-j", env.jobs, "-o", out)
		cmd.Env = append(os.Environ(), "NIXVM_IMAGE_RUN_MAIN=1", "TZ="+env.tz, "TMPDIR="+t.TempDir())
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", cmd.Args, err, b)
		}
		sums = append(sums, sha256File(t, out)+" "+sha256File(t, out+".manifest"))
	}
	if sums[0] != sums[1] {
		t.Errorf("two builds of one closure differ:\n%s", strings.Join(sums, "\n"))
	}
}

// TestBuildBadInput checks that each bad input gets an error that names it,
// and that no output or temporary file is left.
func TestBuildBadInput(t *testing.T) {
	testutil.NeedTool(t, "nix-store")
	fx := nixfixture.Build(t, "small")
	graph, err := os.ReadFile(fx.GraphFile)
	if err != nil {
		t.Fatal(err)
	}
	dump, err := os.ReadFile(fx.DumpDBFile)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(graph), "\n")
	firstPath := lines[0]

	special := specialStorePath(t)

	for _, tc := range []struct {
		name    string
		closure string // file content, "" for --toplevel
		args    []string
		want    []string // substrings of the error
		setup   func(dir string)
	}{
		{name: "malformed", closure: firstPath + "\n\nnot-a-number\n", want: []string{":3:", "number"}},
		{name: "dangling reference", closure: firstPath + "\n\n1\n/nix/store/00000000000000000000000000000000-missing\n", want: []string{"00000000000000000000000000000000-missing"}},
		{name: "missing store path", closure: "/nix/store/11111111111111111111111111111111-gone\n\n0\n", want: []string{"11111111111111111111111111111111-gone", "missing"}},
		{name: "hash mismatch", closure: corruptFirstHash(string(dump)), want: []string{"got sha256:", "want sha256:"}},
		{name: "too small", args: []string{"--size", "16M"}, want: []string{"--size", "too small", "needs at least", "--size auto"}},
		{name: "special file", closure: special + "\n\n0\n", want: []string{special, "FIFO"}},
		{name: "existing output", args: []string{}, want: []string{"exists", "--force"}, setup: func(dir string) {
			os.WriteFile(filepath.Join(dir, "out.qcow2"), []byte("keep me"), 0o644)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "out.qcow2")
			args := []string{"build", "--quiet", "--no-bootloader", "-o", out}
			if tc.closure != "" {
				cf := filepath.Join(t.TempDir(), "closure")
				os.WriteFile(cf, []byte(tc.closure), 0o644)
				args = append(args, "--closure", cf)
			} else {
				args = append(args, "--toplevel", fx.Toplevel)
			}
			args = append(args, tc.args...)
			if tc.setup != nil {
				tc.setup(dir)
			}
			before := listDir(t, dir)
			_, stderr, code := run(t, args...)
			if code == 0 {
				t.Fatalf("build succeeded, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("error %q does not mention %q", strings.TrimSpace(stderr), w)
				}
			}
			if after := listDir(t, dir); after != before {
				t.Errorf("output directory changed: before %q, after %q", before, after)
			}
			if tc.setup != nil {
				if b, _ := os.ReadFile(out); string(b) != "keep me" {
					t.Errorf("existing output was touched")
				}
			}
		})
	}
}

func listDir(t *testing.T, dir string) string {
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}

// corruptFirstHash changes the first NAR hash of a --dump-db registration.
func corruptFirstHash(dump string) string {
	lines := strings.SplitN(dump, "\n", 3)
	h := []byte(lines[1])
	if h[0] == '0' {
		h[0] = '1'
	} else {
		h[0] = '0'
	}
	lines[1] = string(h)
	return strings.Join(lines, "\n")
}

// specialStorePath makes a store-shaped directory holding a FIFO (which Nix
// itself would never produce), removed when the test ends.
func specialStorePath(t *testing.T) string {
	t.Helper()
	p := "/nix/store/22222222222222222222222222222222-nixvm-image-test-fifo"
	if err := os.MkdirAll(p, 0o755); err != nil {
		testutil.Skip(t, "cannot write to /nix/store: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(p) })
	if err := syscall.Mkfifo(p+"/fifo", 0o644); err != nil && !os.IsExist(err) {
		t.Fatal(err)
	}
	return p
}

func TestBuildHelp(t *testing.T) {
	stdout, _, code := run(t, "build", "--help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"--toplevel", "--closure", "--layout", "legacy+gpt", "--size", "auto", "EXIT STATUS", "Examples"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("build --help lacks %q", want)
		}
	}
	if _, stderr, code := run(t, "build", "-o", "x.qcow2"); code != exitUsage || !strings.Contains(stderr, "--toplevel") {
		t.Errorf("build without input: exit %d, stderr %q; want exit 2 naming --toplevel", code, stderr)
	}
}
