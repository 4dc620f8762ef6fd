package main

import (
	"bytes"
	"encoding/json"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/store"
	nixfixture "github.com/nixvm-image/nixvm-image/testkit/fixture"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// storeGen stores data in the store at dir as the new current generation
// of name and returns its path.
func storeGen(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	src, err := push.NewSource(bytes.NewReader(data), int64(len(data)), nil)
	if err != nil {
		t.Fatal(err)
	}
	return storeSource(t, dir, name, src)
}

// storeSource stores src as the new current generation of name, as a push
// would, and returns its path.
func storeSource(t *testing.T, dir, name string, src *push.Source) string {
	t.Helper()
	m := &manifest.Manifest{VirtualSize: src.VirtualSize, Blocks: src.Blocks, Digest: src.Digest}
	g, err := (&store.Store{Dir: dir}).Put(name, src.R, m)
	if err != nil {
		t.Fatal(err)
	}
	// Generations are ordered by mtime; make the order certain on fast machines.
	time.Sleep(20 * time.Millisecond)
	return g.Path
}

func randomDisk(seed int64, size int) []byte {
	b := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(b[:size/2])
	return b
}

// TestProvisionCLI runs provision and gc as a user would: a file and an
// overlay from the store's current image, a second run leaving the disk
// alone, usage errors with exit 2, and gc --dry-run then gc.
func TestProvisionCLI(t *testing.T) {
	qemuImg := testutil.NeedTool(t, "qemu-img")[0]
	dir := t.TempDir()
	store := filepath.Join(dir, "images")
	g1 := storeGen(t, store, "baseline", randomDisk(1, 4<<20))
	disks := filepath.Join(dir, "disks")
	os.Mkdir(disks, 0o755)
	file := filepath.Join(disks, "web1.raw")
	ov := filepath.Join(disks, "ci1.qcow2")
	common := []string{"--store-dir", store, "--image", "baseline", "-q"}

	code, out, errs := cli(t, append([]string{"provision", "--guest", "web1", "--size", "16M", "--target", file}, common...)...)
	if code != 0 || !strings.HasPrefix(out, "created "+file+": 16.0 MiB disk from "+g1) {
		t.Fatalf("provision file: exit %d\n%s%s", code, out, errs)
	}
	if b, err := exec.Command(qemuImg, "compare", "-f", "raw", "-F", "qcow2", file, g1).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, b)
	}
	before := sha256File(t, file)
	code, out, errs = cli(t, append([]string{"provision", "--guest", "web1", "--size", "16M", "--target", file}, common...)...)
	if code != 0 || !strings.Contains(out, "exists, left untouched") || sha256File(t, file) != before {
		t.Fatalf("second provision: exit %d\n%s%s", code, out, errs)
	}
	code, out, errs = cli(t, append([]string{"provision", "--guest", "ci1", "--size", "1G", "--overlay", ov}, common...)...)
	if code != 0 || !strings.Contains(out, "qcow2 overlay of 1.0 GiB on "+g1) {
		t.Fatalf("provision overlay: exit %d\n%s%s", code, out, errs)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"provision", "--guest", "x", "--target", file, "--overlay", ov}, "exactly one"},
		{[]string{"provision", "--target", file}, "--guest"},
		{[]string{"provision", "--guest", "x", "--target", file, "--size", "lots"}, "--size"},
		{[]string{"provision", "--guest", "x", "--target", file, "--volume", "v"}, "--volume goes with --pool"},
		{[]string{"provision", "--guest", "x", "--target", file, "--image", "bad name"}, "--image"},
		{[]string{"gc"}, "--keep"},
	} {
		code, _, errs := cli(t, append(tc.args, "--store-dir", store)...)
		if code != 2 || !strings.Contains(errs, tc.want) {
			t.Errorf("%q: exit %d, want 2 mentioning %q\n%s", tc.args, code, tc.want, errs)
		}
	}
	code, _, errs = cli(t, "provision", "--guest", "x", "--target", filepath.Join(disks, "small.raw"), "--size", "1M", "--store-dir", store)
	if code != 1 || !strings.Contains(errs, "--size") || !strings.Contains(errs, "smaller than the image") {
		t.Errorf("small --size: exit %d, want 1\n%s", code, errs)
	}
	code, _, errs = cli(t, "provision", "--guest", "x", "--target", filepath.Join(disks, "n.raw"), "--image", "nothere", "--store-dir", store)
	if code != 1 || !strings.Contains(errs, "nixvm-image push") {
		t.Errorf("missing image: exit %d, want 1 with a hint\n%s", code, errs)
	}

	g2 := storeGen(t, store, "baseline", randomDisk(2, 4<<20))
	g3 := storeGen(t, store, "baseline", randomDisk(3, 4<<20))
	code, out, errs = cli(t, "gc", "--keep", "1", "--scan", disks, "--store-dir", store, "--dry-run")
	if code != 0 || !strings.Contains(out, "would remove  "+g2) || !strings.Contains(out, "keep          "+g1+"  referenced by "+ov) ||
		!strings.Contains(out, "keep          "+g3+"  current") || !strings.Contains(out, "would remove 1 of 3") {
		t.Fatalf("gc --dry-run: exit %d\n%s%s", code, out, errs)
	}
	if _, err := os.Stat(g2); err != nil {
		t.Fatalf("dry run removed %s", g2)
	}
	code, out, errs = cli(t, "gc", "--keep", "1", "--scan", disks, "--store-dir", store)
	if code != 0 || !strings.Contains(out, "removed 1 of 3") {
		t.Fatalf("gc: exit %d\n%s%s", code, out, errs)
	}
	for p, want := range map[string]bool{g1: true, g2: false, g3: true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", p, err == nil, want)
		}
	}
	if b, err := exec.Command(qemuImg, "compare", ov, g1).CombinedOutput(); err != nil {
		t.Fatalf("overlay after gc: %v\n%s", err, b)
	}
}

func TestProvisionHelp(t *testing.T) {
	for _, name := range []string{"provision", "gc"} {
		code, out, _ := cli(t, name, "--help")
		if code != 0 || !strings.Contains(out, "Examples:") || !strings.Contains(out, "EXIT STATUS") {
			t.Errorf("%s --help: exit %d\n%s", name, code, out)
		}
	}
}

// TestProvisionBuiltImage provisions from a real image: the small Nix
// fixture built by nixvm-image build (zstd qcow2, no boot loader), received
// into the store as a push would, then copied into a raw file 64 MiB larger.
// The disk equals the generation and the built image (qemu-img compare) and
// its root file system passes e2fsck -fn.
func TestProvisionBuiltImage(t *testing.T) {
	tools := testutil.NeedTool(t, "qemu-img", "sfdisk", "e2fsck")
	qemuImg, sfdisk, e2fsck := tools[0], tools[1], tools[2]
	fx := nixfixture.Build(t, "small")
	dir := t.TempDir()
	img := filepath.Join(dir, "baseline.qcow2")
	if _, stderr, code := run(t, "build", "--quiet", "--no-bootloader", "--toplevel", fx.Toplevel, "-o", img); code != 0 {
		t.Fatalf("build: exit %d: %s", code, stderr)
	}
	src, err := push.OpenSource(img, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	store := filepath.Join(dir, "images")
	gen := storeSource(t, store, "baseline", src)
	disk := filepath.Join(dir, "guest.raw")
	size := src.VirtualSize + 64<<20
	start := time.Now()
	code, out, errs := cli(t, "provision", "-q", "--store-dir", store, "--guest", "g", "--size", strconv.FormatInt(size, 10), "--target", disk)
	if code != 0 {
		t.Fatalf("provision: exit %d\n%s%s", code, out, errs)
	}
	t.Logf("%s (%s)", strings.TrimSpace(out), time.Since(start).Round(time.Millisecond))
	mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "qcow2", disk, gen)
	mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "qcow2", disk, img)
	var table sfdiskJSON
	json.Unmarshal([]byte(mustRun(t, sfdisk, "--json", disk)), &table)
	plan := planFromTable(t, partition.Legacy, table, size)
	if b, err := exec.Command(e2fsck, "-fn", partitionFile(t, disk, plan.Root)).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, b)
	}
}
