package provision

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// memWriter is an io.WriterAt into a byte slice.
type memWriter []byte

func (m memWriter) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }

// TestCopy copies a store generation into memory and checks the bytes, that
// zero ranges are reported coalesced and in order, and that written plus
// zeroed covers the guest disk exactly once.
func TestCopy(t *testing.T) {
	data := testImage(1, 6*mib)
	g := putGen(t, newStore(t), "baseline", data)
	f, img, err := openImage(g.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer img.Close()
	for _, size := range []int64{6 * mib, 10 * mib} {
		dst := make(memWriter, size)
		for i := range dst {
			dst[i] = 0xAA // stale data: every byte must be written or zeroed
		}
		var last int64
		zero := func(off, n int64) error {
			if off < last {
				t.Errorf("zero range at %d after one ending at %d", off, last)
			}
			if off == last && last != 0 {
				t.Errorf("adjacent zero ranges at %d not coalesced", off)
			}
			clear(dst[off : off+n])
			last = off + n
			return nil
		}
		st, err := Copy(dst, img, size, zero, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, size)
		copy(want, data)
		if !bytes.Equal(dst, want) {
			t.Fatalf("size %d: copy differs from the image", size)
		}
		if st.Written+st.Zeroed != size {
			t.Errorf("size %d: written %d + zeroed %d, want %d", size, st.Written, st.Zeroed, size)
		}
		var nonzero int64
		for off := 0; off < len(data); off += blockSize {
			if !zeros.All(data[off : off+blockSize]) {
				nonzero += blockSize
			}
		}
		if st.Written != nonzero {
			t.Errorf("size %d: wrote %d bytes, want only the %d non-zero ones", size, st.Written, nonzero)
		}
	}
	if _, err := Copy(make(memWriter, mib), img, mib, nil, nil); !errors.Is(err, ErrSize) {
		t.Errorf("smaller than the image: got %v, want ErrSize", err)
	}
}

// TestFile provisions a sparse raw file larger than the base, checks it with
// qemu-img compare, then shows an existing disk is left byte for byte, and
// that --force recreates it.
func TestFile(t *testing.T) {
	st := newStore(t)
	data := testImage(2, 8*mib)
	g := putGen(t, st, "baseline", data)
	dir := t.TempDir()
	target := filepath.Join(dir, "web1.raw")
	req := Request{Image: g.Path, Size: 32 * mib, Target: target}
	res, err := Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Created || res.Size != 32*mib {
		t.Fatalf("got %+v, want created at 32 MiB", res)
	}
	fi, err := os.Stat(target)
	if err != nil || fi.Size() != 32*mib {
		t.Fatalf("stat %s: %v, size %d, want %d", target, err, fi.Size(), 32*mib)
	}
	compareWithBase(t, target, "raw", g.Path)
	if a := allocated(t, target); a > res.Written+mib {
		t.Errorf("raw file occupies %d bytes, want about the %d written (sparse)", a, res.Written)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("stray files beside the disk: %v", ents)
	}

	// An existing disk is never touched.
	before := writeRandom(t, target, 3*mib)
	res, err = Provision(context.Background(), req)
	if err != nil || res.Created {
		t.Fatalf("existing disk: got %+v, %v, want left alone", res, err)
	}
	mustEqualFile(t, target, before)

	// --force recreates it.
	req.Force = true
	if res, err = Provision(context.Background(), req); err != nil || !res.Created {
		t.Fatalf("force: got %+v, %v", res, err)
	}
	compareWithBase(t, target, "raw", g.Path)

	// A size below the image's is refused.
	req.Target, req.Size = filepath.Join(dir, "small.raw"), 4*mib
	if _, err := Provision(context.Background(), req); !errors.Is(err, ErrSize) {
		t.Errorf("small size: got %v, want ErrSize", err)
	}
	if _, err := os.Stat(req.Target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused disk exists: %v", err)
	}

	// A missing device that is not /dev/VG/LV is not made a file in /dev.
	req.Target, req.Size = "/dev/nixvm-test-no-such-disk", 0
	if _, err := Provision(context.Background(), req); !errors.Is(err, ErrTarget) {
		t.Errorf("missing device: got %v, want ErrTarget", err)
	}
	if _, err := os.Lstat(req.Target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s was created: %v", req.Target, err)
	}
}

// TestForceRefusedWhileLocked holds an OFD lock on the disk as QEMU does on
// an image it has open; --force must refuse and leave the disk untouched.
func TestForceRefusedWhileLocked(t *testing.T) {
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(3, 2*mib))
	target := filepath.Join(t.TempDir(), "disk.raw")
	before := writeRandom(t, target, mib)
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_RDLCK, Start: 100, Len: 1} // like QEMU's permission bytes
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	_, err = Provision(context.Background(), Request{Image: g.Path, Target: target, Force: true})
	if !errors.Is(err, ErrInUse) {
		t.Fatalf("got %v, want ErrInUse", err)
	}
	mustEqualFile(t, target, before)
}

// fakeVirsh answers list and domblklist like virsh and records its calls.
func fakeVirsh(running map[string][]string, calls *[]string) *Virsh {
	return &Virsh{Run: func(ctx context.Context, argv []string) ([]byte, error) {
		*calls = append(*calls, strings.Join(argv, " "))
		args := argv[2:] // virsh -q
		switch args[0] {
		case "list":
			var names []string
			for n := range running {
				names = append(names, n)
			}
			return []byte(strings.Join(names, "\n") + "\n"), nil
		case "domblklist":
			dom := args[len(args)-1]
			var b strings.Builder
			for i, s := range running[dom] {
				b.WriteString(" file   disk   vd" + string(rune('a'+i)) + "   " + s + "\n")
			}
			b.WriteString(" file   cdrom  sda   -\n")
			return []byte(b.String()), nil
		}
		return nil, &ToolError{Argv: argv, Stderr: "unexpected", Err: errors.New("exit status 1")}
	}}
}

// TestForceRefusedRunningDomain: --force is refused while a running domain
// lists the disk (through a symlink too) or while the guest itself runs.
func TestForceRefusedRunningDomain(t *testing.T) {
	st := newStore(t)
	g := putGen(t, st, "baseline", testImage(4, 2*mib))
	dir := t.TempDir()
	target := filepath.Join(dir, "disk.raw")
	before := writeRandom(t, target, mib)
	link := filepath.Join(dir, "link.raw")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		running map[string][]string
		guest   string
		wantErr error
	}{
		{"other domain uses it", map[string][]string{"db": {"/x/other.qcow2"}, "web": {link}}, "web1", ErrInUse},
		{"guest runs", map[string][]string{"web1": {"/x/web1.qcow2"}}, "web1", ErrInUse},
		{"free", map[string][]string{"db": {"/x/other.qcow2"}}, "web1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls []string
			_, err := Provision(context.Background(), Request{Image: g.Path, Target: target, Force: true, Guest: tc.guest, Virsh: fakeVirsh(tc.running, &calls)})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("got %v, want %v (virsh calls %q)", err, tc.wantErr, calls)
			}
			if tc.wantErr != nil {
				mustEqualFile(t, target, before)
			} else {
				compareWithBase(t, target, "raw", g.Path)
			}
		})
	}
}

// TestOverlay makes an overlay on the current generation, checks its
// backing chain with qemu-img info (the immutable path, not current), its
// content with qemu-img compare and check, then pushes a new generation:
// the overlay still reads as the old base, and gc keeps the old generation
// while it finds the overlay.
func TestOverlay(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	st := newStore(t)
	g1 := putGen(t, st, "baseline", testImage(5, 4*mib))
	dir := t.TempDir()
	ov := filepath.Join(dir, "ci1.qcow2")
	res, err := Provision(context.Background(), Request{Kind: Overlay, Image: filepath.Join(st.Dir, "baseline", "current"), Target: ov, Size: 64 * mib})
	if err != nil || !res.Created {
		t.Fatalf("got %+v, %v", res, err)
	}
	var chain []struct {
		Filename              string `json:"filename"`
		Format                string `json:"format"`
		VirtualSize           int64  `json:"virtual-size"`
		BackingFilename       string `json:"backing-filename"`
		FullBackingFilename   string `json:"full-backing-filename"`
		BackingFilenameFormat string `json:"backing-filename-format"`
	}
	out := run(t, qimg, "info", "--backing-chain", "--output=json", ov)
	if err := json.Unmarshal([]byte(out), &chain); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if len(chain) != 2 {
		t.Fatalf("backing chain: got %d images, want 2:\n%s", len(chain), out)
	}
	if c := chain[0]; c.Format != "qcow2" || c.VirtualSize != 64*mib || c.BackingFilename != g1.Path || c.BackingFilenameFormat != "qcow2" {
		t.Errorf("overlay: got %+v, want qcow2 of %d bytes backed by %s (qcow2)", c, 64*mib, g1.Path)
	}
	if c := chain[1]; c.Filename != g1.Path || c.Format != "qcow2" || c.BackingFilename != "" {
		t.Errorf("base: got %+v, want %s without backing", c, g1.Path)
	}
	run(t, qimg, "check", ov)
	compareWithBase(t, ov, "qcow2", g1.Path)

	// Existing overlay untouched.
	b, _ := os.ReadFile(ov)
	if res, err := Provision(context.Background(), Request{Kind: Overlay, Image: g1.Path, Target: ov}); err != nil || res.Created {
		t.Fatalf("existing overlay: got %+v, %v", res, err)
	}
	mustEqualFile(t, ov, b)

	// A new push does not change the guest's disk; gc keeps what it uses.
	g2 := putGen(t, st, "baseline", testImage(6, 4*mib))
	compareWithBase(t, ov, "qcow2", g1.Path)
	rep, err := st.GC(context.Background(), store.GCOptions{ScanDirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	if kept := keptBy(rep.Decisions); len(kept) != 2 || kept[g1.Path] != "referenced" || kept[g2.Path] != "current" {
		t.Errorf("gc kept %q, want %s (referenced) and %s (current)", kept, g1.Path, g2.Path)
	}
	compareWithBase(t, ov, "qcow2", g1.Path)

	// Without the directory to scan, gc does not know and removes it.
	if _, err := st.GC(context.Background(), store.GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(g1.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unreferenced generation %s still there: %v", g1.Path, err)
	}
}

func TestParseVirsh(t *testing.T) {
	vols := parseVolList(" guest-web1   /var/lib/libvirt/images/guest-web1\n ci 1  /x\n weird   /path with space/v.img\n\n")
	if want := []string{"/var/lib/libvirt/images/guest-web1", "/path with space/v.img"}; strings.Join(vols, "|") != strings.Join(want, "|") {
		t.Errorf("vol-list: got %q, want %q", vols, want)
	}
	srcs := parseDomblklist(" file   disk   vda   /var/lib/libvirt/images/a.qcow2\n block  disk   vdb   /dev/vg/guest-b\n file   cdrom  sda   -\n")
	if want := []string{"/var/lib/libvirt/images/a.qcow2", "/dev/vg/guest-b"}; strings.Join(srcs, "|") != strings.Join(want, "|") {
		t.Errorf("domblklist: got %q, want %q", srcs, want)
	}
	f, err := parseDiskFormats(`<domain><devices><disk type="file"><driver name="qemu" type="raw"/><target dev="vda"/></disk>` +
		`<disk type="block"><driver type="qcow2"/><target dev="vdb"/></disk></devices></domain>`)
	if err != nil || f["vda"] != "raw" || f["vdb"] != "qcow2" {
		t.Errorf("disk formats: got %v, %v; want vda raw, vdb qcow2", f, err)
	}
}

// TestOverlayBesideGC makes an overlay while a push makes another
// generation current and gc runs, at the worst moment: after provision
// resolved current, before qemu-img created the overlay. The overlay's base
// must survive (issue 12 item 5): gc skips the name while provision uses
// it. On main, gc removed the base and qemu-img create failed.
func TestOverlayBesideGC(t *testing.T) {
	testutil.NeedTool(t, "qemu-img")
	st := newStore(t)
	g1 := putGen(t, st, "baseline", testImage(5, 4*mib))
	dir := t.TempDir()
	var rep *store.GCReport
	run := func(ctx context.Context, argv []string) ([]byte, error) {
		putGen(t, st, "baseline", testImage(6, 4*mib))
		var err error
		if rep, err = st.GC(ctx, store.GCOptions{ScanDirs: []string{dir}}); err != nil {
			t.Errorf("gc: %v", err)
		}
		return ExecRunner(ctx, argv)
	}
	ov := filepath.Join(dir, "ci1.qcow2")
	res, err := Provision(context.Background(), Request{Kind: Overlay, Store: st, Name: "baseline", Target: ov, Run: run})
	if err != nil || !res.Created || res.Image != g1.Path {
		t.Fatalf("provision beside gc: got %+v, %v; want an overlay on %s", res, err, g1.Path)
	}
	if rep == nil || len(rep.Skipped) != 1 || rep.Skipped[0].Name != "baseline" {
		t.Errorf("gc beside provision: got %+v, want baseline skipped", rep)
	}
	compareWithBase(t, ov, "qcow2", g1.Path)
	// Now gc sees the overlay and keeps its base.
	if rep, err = st.GC(context.Background(), store.GCOptions{ScanDirs: []string{dir}}); err != nil {
		t.Fatal(err)
	}
	if kept := keptBy(rep.Decisions); kept[g1.Path] != "referenced" {
		t.Errorf("gc after provision kept %q, want %s referenced", kept, g1.Path)
	}
	if _, err := Provision(context.Background(), Request{Kind: Overlay, Store: st, Name: "nothere", Target: ov + "2"}); !errors.Is(err, store.ErrNoCurrent) {
		t.Errorf("provision of a missing name: got %v, want store.ErrNoCurrent", err)
	}
}
