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
	store := newStore(t)
	data := testImage(1, 6*mib)
	g := pushGen(t, store, "baseline", data)
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
			if !allZero(data[off : off+blockSize]) {
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
	store := newStore(t)
	data := testImage(2, 8*mib)
	g := pushGen(t, store, "baseline", data)
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
	store := newStore(t)
	g := pushGen(t, store, "baseline", testImage(3, 2*mib))
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
	store := newStore(t)
	g := pushGen(t, store, "baseline", testImage(4, 2*mib))
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
	store := newStore(t)
	g1 := pushGen(t, store, "baseline", testImage(5, 4*mib))
	dir := t.TempDir()
	ov := filepath.Join(dir, "ci1.qcow2")
	res, err := Provision(context.Background(), Request{Kind: Overlay, Image: filepath.Join(store.Dir, "baseline", "current"), Target: ov, Size: 64 * mib})
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
	if got, err := backingOf(ov); err != nil || got != g1.Path {
		t.Errorf("BackingFile: got %q, %v, want %s", got, err, g1.Path)
	}

	// Existing overlay untouched.
	b, _ := os.ReadFile(ov)
	if res, err := Provision(context.Background(), Request{Kind: Overlay, Image: g1.Path, Target: ov}); err != nil || res.Created {
		t.Fatalf("existing overlay: got %+v, %v", res, err)
	}
	mustEqualFile(t, ov, b)

	// A new push does not change the guest's disk; gc keeps what it uses.
	g2 := pushGen(t, store, "baseline", testImage(6, 4*mib))
	compareWithBase(t, ov, "qcow2", g1.Path)
	ds, err := GC(context.Background(), GCOptions{Store: store, ScanDirs: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	checkKept(t, ds, map[string]string{g1.Path: "referenced", g2.Path: "current"})
	compareWithBase(t, ov, "qcow2", g1.Path)

	// Without the directory to scan, gc does not know and removes it.
	if _, err := GC(context.Background(), GCOptions{Store: store}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(g1.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unreferenced generation %s still there: %v", g1.Path, err)
	}
}

func backingOf(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return BackingFile(f)
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
// it, dry run removes nothing, and removal takes the push lock.
func TestGC(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	store := newStore(t)
	var gens []string
	for i := range 5 {
		gens = append(gens, pushGen(t, store, "baseline", testImage(int64(10+i), 2*mib)).Path)
	}
	other := pushGen(t, store, "other", testImage(20, 2*mib)).Path
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

	o := GCOptions{Store: store, Names: []string{"baseline"}, Keep: 2, ScanDirs: []string{scan}, DryRun: true}
	ds, err := GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{gens[4]: "current", gens[3]: "newest 2", gens[1]: "referenced", gens[0]: "referenced"}
	for _, d := range ds {
		if _, err := os.Stat(d.Gen.Path); err != nil {
			t.Errorf("dry run removed %s", d.Gen.Path)
		}
	}
	if len(ds) != 5 {
		t.Fatalf("got %d decisions, want 5", len(ds))
	}
	unlock, err := store.Lock("baseline")
	if err != nil {
		t.Fatal(err)
	}
	o.DryRun = false
	if _, err := GC(context.Background(), o); err == nil {
		t.Error("gc ran while a push held the lock")
	}
	unlock()
	ds, err = GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	checkKept(t, ds, want)
	if _, err := os.Stat(gens[2] + ".manifest"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("removed generation's manifest left: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("gc of baseline touched another name: %v", err)
	}
	// The store still lists what is left, current first.
	left, err := store.List("baseline")
	if err != nil || len(left) != 4 || left[0].Path != gens[4] {
		t.Errorf("after gc: %v, %+v", err, left)
	}
}

func TestBackingFile(t *testing.T) {
	hdr := func(version uint32, off uint64, n uint32, name string) []byte {
		b := make([]byte, 512)
		copy(b, "QFI\xfb")
		b[7] = byte(version)
		for i := range 8 {
			b[8+i] = byte(off >> (56 - 8*i))
		}
		for i := range 4 {
			b[16+i] = byte(n >> (24 - 8*i))
		}
		copy(b[off:], name)
		return b
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
		err  error
	}{
		{"none", hdr(3, 0, 0, ""), "", nil},
		{"v3", hdr(3, 200, 9, "/base.img"), "/base.img", nil},
		{"v2 relative", hdr(2, 72, 4, "b.qc"), "b.qc", nil},
		{"raw", make([]byte, 512), "", ErrNotQcow2},
		{"short", []byte("QFI"), "", ErrNotQcow2},
		{"version 4", hdr(4, 0, 0, ""), "", ErrBadHeader},
		{"name past end", hdr(3, 500, 100, ""), "", ErrBadHeader},
		{"name too long", hdr(3, 200, 5000, ""), "", ErrBadHeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := BackingFile(bytes.NewReader(tc.in))
			if got != tc.want || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Errorf("got %q, %v, want %q, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

// FuzzBackingFile: BackingFile never panics, never returns a name longer
// than QEMU allows, and a name it returns is exactly the bytes the header
// points at.
func FuzzBackingFile(f *testing.F) {
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x04/a/b"))
	f.Add(make([]byte, 100))
	f.Fuzz(func(t *testing.T, b []byte) {
		name, err := BackingFile(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(name) > maxBackingName {
			t.Fatalf("name of %d bytes", len(name))
		}
		if name != "" {
			off := int(b[8])<<56 | int(b[9])<<48 | int(b[10])<<40 | int(b[11])<<32 | int(b[12])<<24 | int(b[13])<<16 | int(b[14])<<8 | int(b[15])
			if off+len(name) > len(b) || string(b[off:off+len(name)]) != name {
				t.Fatalf("name %q is not the bytes at %d", name, off)
			}
		}
	})
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
}
