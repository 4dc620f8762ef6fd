package resize

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

const mib = 1 << 20

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	return testutil.RunTool(t, "", name, args...)
}

// testDisk is an image file partitioned by sfdisk with an ext4 made by
// mkfs.ext4 in partition pno, then enlarged like `qemu-img resize`.
type testDisk struct {
	path       string
	ss         int
	pno        int
	partStart  uint64 // sectors
	partSize   uint64 // sectors, as the kernel saw it at boot
	size       int64  // bytes after growing
	sysfs      string
	devRoot    string
	major      uint32
	minor      uint32
	diskName   string
	partName   string
	blkpgCalls []string
	fsCalls    []uint64
}

type diskSpec struct {
	label    string // "gpt" or "dos"
	ss       int    // 0 means 512
	script   string // sfdisk partition lines after the label
	pno      int    // 0 means 1
	sizeMiB  int64  // size when partitioned
	growTo   int64  // bytes after growing; 0 means 4x
	noFS     bool
	naming   string // sysfs layout: "virtio" (default), "scsi", "nvme", "xen"
	fsSizeMB int    // 0: fill the partition
}

func newTestDisk(t *testing.T, spec diskSpec) *testDisk {
	t.Helper()
	if spec.ss == 0 {
		spec.ss = 512
	}
	if spec.pno == 0 {
		spec.pno = 1
	}
	if spec.growTo == 0 {
		spec.growTo = 4 * spec.sizeMiB * mib
	}
	dir := t.TempDir()
	d := &testDisk{path: filepath.Join(dir, "disk.img"), ss: spec.ss, pno: spec.pno, size: spec.growTo}
	if err := os.Truncate(d.path, 0); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	f, err := os.Create(d.path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(spec.sizeMiB * mib)
	f.Close()
	if spec.label == "sgdisk" {
		// sgdisk ends the partition at the last usable LBA, sfdisk on a 1 MiB boundary.
		run(t, "sgdisk", "-n", "1:2048:0", d.path)
		spec.label = "gpt"
	} else {
		script := "label: " + spec.label + "\n" + spec.script
		p, err := testutil.LookTool("sfdisk")
		if err != nil {
			testutil.Skip(t, "sfdisk not found")
		}
		cmd := exec.Command(p, "--no-reread", "--no-tell-kernel", "-q", d.path)
		cmd.Stdin = strings.NewReader(script)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("sfdisk %s <<%q: %v\n%s", d.path, script, err, out)
		}
	}
	part := sfdiskPart(t, d.path, spec.pno)
	d.partStart, d.partSize = part.Start, part.Size
	if !spec.noFS {
		fsSize := fmt.Sprintf("%dk", part.Size*uint64(spec.ss)/1024)
		if spec.fsSizeMB > 0 {
			fsSize = fmt.Sprintf("%dM", spec.fsSizeMB)
		}
		run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", "-E", fmt.Sprintf("offset=%d", part.Start*uint64(spec.ss)), d.path, fsSize)
	}
	if err := os.Truncate(d.path, spec.growTo); err != nil {
		t.Fatal(err)
	}
	d.fakeSysfs(t, spec.naming)
	return d
}

type sfPart struct {
	Node  string `json:"node"`
	Start uint64 `json:"start"`
	Size  uint64 `json:"size"`
	Type  string `json:"type"`
}

func sfdiskParts(t *testing.T, path string, ss int) []sfPart {
	t.Helper()
	// Debian 12's sfdisk (util-linux 2.38) has no --sector-size: 512 only.
	out := run(t, "sfdisk", "--json", path)
	var v struct {
		PT struct {
			Label      string   `json:"label"`
			LastLBA    uint64   `json:"lastlba"`
			Partitions []sfPart `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("sfdisk --json: %v\n%s", err, out)
	}
	return v.PT.Partitions
}

func sfdiskPart(t *testing.T, path string, pno int) sfPart {
	t.Helper()
	for _, p := range sfdiskParts(t, path, 512) {
		if p.Node == fmt.Sprintf("%s%d", path, pno) {
			return p
		}
	}
	t.Fatalf("sfdisk --json %s: no partition %d", path, pno)
	return sfPart{}
}

// fakeSysfs builds the sysfs entries the kernel would show for the disk,
// with the device naming of the given bus.
func (d *testDisk) fakeSysfs(t *testing.T, naming string) {
	t.Helper()
	root := t.TempDir()
	var devPath string
	switch naming {
	case "", "virtio":
		d.diskName, d.partName, d.major = "vda", fmt.Sprintf("vda%d", d.pno), 252
		devPath = "devices/pci0000:00/0000:00:04.0/virtio1/block"
	case "scsi":
		d.diskName, d.partName, d.major = "sda", fmt.Sprintf("sda%d", d.pno), 8
		devPath = "devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:0/block"
	case "nvme":
		d.diskName, d.partName, d.major = "nvme0n1", fmt.Sprintf("nvme0n1p%d", d.pno), 259
		devPath = "devices/pci0000:00/0000:00:06.0/nvme/nvme0/nvme0n1/.." // the disk dir sits under nvme0
		devPath = "devices/pci0000:00/0000:00:06.0/nvme/nvme0"
	case "xen":
		d.diskName, d.partName, d.major = "xvda", fmt.Sprintf("xvda%d", d.pno), 202
		devPath = "devices/vbd-51712/block"
	default:
		t.Fatalf("BUG: naming %q", naming)
	}
	d.minor = uint32(d.pno)
	diskDir := filepath.Join(root, devPath, d.diskName)
	partDir := filepath.Join(diskDir, d.partName)
	write := func(dir, name, val string) {
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(val+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(diskDir, "size", fmt.Sprint(d.size/512))
	write(diskDir, "queue/logical_block_size", fmt.Sprint(d.ss))
	write(diskDir, "uevent", fmt.Sprintf("MAJOR=%d\nMINOR=0\nDEVNAME=%s\nDEVTYPE=disk", d.major, d.diskName))
	write(partDir, "partition", fmt.Sprint(d.pno))
	write(partDir, "start", fmt.Sprint(d.partStart*uint64(d.ss)/512))
	write(partDir, "size", fmt.Sprint(d.partSize*uint64(d.ss)/512))
	write(partDir, "uevent", fmt.Sprintf("MAJOR=%d\nMINOR=%d\nDEVNAME=%s\nDEVTYPE=partition", d.major, d.minor, d.partName))
	os.MkdirAll(filepath.Join(root, "dev/block"), 0o755)
	rel, _ := filepath.Rel(filepath.Join(root, "dev/block"), partDir)
	if err := os.Symlink(rel, filepath.Join(root, "dev/block", fmt.Sprintf("%d:%d", d.major, d.minor))); err != nil {
		t.Fatal(err)
	}
	d.sysfs = root
	d.devRoot = "/fakedev"
}

// section is a partition device backed by a window of the image file.
type section struct {
	f   *os.File
	off int64
}

func (s section) ReadAt(b []byte, off int64) (int, error)  { return s.f.ReadAt(b, s.off+off) }
func (s section) WriteAt(b []byte, off int64) (int, error) { return s.f.WriteAt(b, s.off+off) }
func (s section) Sync() error                              { return s.f.Sync() }
func (s section) Close() error                             { return s.f.Close() }

// cutDevice fails every write after the first n, like a power cut.
type cutDevice struct {
	Device
	n *int
}

var errPowerCut = errors.New("simulated power cut")

func (c cutDevice) WriteAt(b []byte, off int64) (int, error) {
	if *c.n <= 0 {
		return 0, errPowerCut
	}
	*c.n--
	return c.Device.WriteAt(b, off)
}

func (d *testDisk) options(t *testing.T) Options {
	return Options{
		Mountpoint: "/",
		SysfsRoot:  d.sysfs,
		DevRoot:    d.devRoot,
		StatDev: func(path string) (uint32, uint32, error) {
			if path != "/" {
				return 0, 0, fmt.Errorf("stat %s: no such file", path)
			}
			return d.major, d.minor, nil
		},
		Open: func(path string, write bool) (Device, error) {
			flag := os.O_RDONLY
			if write {
				flag = os.O_RDWR
			}
			f, err := os.OpenFile(d.path, flag, 0)
			if err != nil {
				return nil, err
			}
			switch path {
			case filepath.Join(d.devRoot, d.diskName):
				return f, nil
			case filepath.Join(d.devRoot, d.partName):
				return section{f, int64(d.partStart) * int64(d.ss)}, nil
			}
			f.Close()
			return nil, fmt.Errorf("open %s: no such device", path)
		},
		ResizePartition: func(disk string, pno int, start, length int64) error {
			d.blkpgCalls = append(d.blkpgCalls, fmt.Sprintf("%s %d %d %d", disk, pno, start, length))
			// What the kernel does: sysfs shows the new size.
			sysPart := filepath.Join(d.sysfs, "dev/block", fmt.Sprintf("%d:%d", d.major, d.minor))
			return os.WriteFile(filepath.Join(sysPart, "size"), []byte(fmt.Sprint(length/512)), 0o644)
		},
		ResizeFS: func(mp string, blocks uint64) error {
			d.fsCalls = append(d.fsCalls, blocks)
			// Stand-in for the kernel: only the block count, so that the
			// next run sees a grown file system. (The real growth is tested
			// in the QEMU guest, cmd/nixvm-resize.)
			f, err := os.OpenFile(d.path, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			sb := int64(d.partStart)*int64(d.ss) + 1024
			var b [4]byte
			binary.LittleEndian.PutUint32(b[:], uint32(blocks))
			f.WriteAt(b[:], sb+4)
			binary.LittleEndian.PutUint32(b[:], uint32(blocks>>32))
			f.WriteAt(b[:], sb+0x150)
			return nil
		},
	}
}

// checkTable runs the reference tools on the grown image and checks that
// partition pno ends at wantEnd.
func (d *testDisk) checkTable(t *testing.T, label string, wantEnd uint64) {
	t.Helper()
	if label != "dos" {
		out := run(t, "sgdisk", "-v", d.path)
		if !strings.Contains(out, "No problems found") {
			t.Errorf("sgdisk -v %s:\n%s", d.path, out)
		}
	}
	p := sfdiskPart(t, d.path, d.pno)
	if got := p.Start + p.Size - 1; got != wantEnd || p.Start != d.partStart {
		t.Errorf("sfdisk --json: partition %d is %d-%d, want %d-%d", d.pno, p.Start, got, d.partStart, wantEnd)
	}
}

func TestGrow(t *testing.T) {
	tests := []struct {
		name string
		spec diskSpec
	}{
		{"gpt vda", diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64}},
		{"mbr vda", diskSpec{label: "dos", script: "start=2048\n", sizeMiB: 64}},
		{"gpt sda", diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64, naming: "scsi"}},
		{"mbr nvme0n1p1", diskSpec{label: "dos", script: "start=2048\n", sizeMiB: 64, naming: "nvme"}},
		{"gpt nvme0n1p1", diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64, naming: "nvme"}},
		{"mbr xvda", diskSpec{label: "dos", script: "start=2048\n", sizeMiB: 64, naming: "xen"}},
		{"gpt root is partition 2 after ESP", diskSpec{label: "gpt", script: "start=2048,size=16MiB,type=U\nstart=34816\n", pno: 2, sizeMiB: 64}},
		{"mbr root is partition 2", diskSpec{label: "dos", script: "start=2048,size=16MiB\nstart=34816\n", pno: 2, sizeMiB: 64}},
		{"gpt fs smaller than partition, disk not grown", diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64, growTo: 64 * mib, fsSizeMB: 32}},
		{"gpt made by sgdisk (ends at last usable LBA), grown", diskSpec{label: "sgdisk", sizeMiB: 64}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newTestDisk(t, tt.spec)
			var out bytes.Buffer
			res, err := Run(d.options(t), &out)
			t.Logf("output:\n%s", out.String())
			if err != nil {
				t.Fatal(err)
			}
			sectors := uint64(d.size) / uint64(d.ss)
			wantEnd := sectors - 1
			if tt.spec.label != "dos" {
				wantEnd = (sectors-33)/2048*2048 - 1 // 1 MiB-aligned, before the backup GPT
			}
			d.checkTable(t, tt.spec.label, wantEnd)
			wantBytes := (wantEnd - d.partStart + 1) * uint64(d.ss)
			if tt.spec.growTo != 64*mib || tt.spec.fsSizeMB == 0 {
				wantCall := fmt.Sprintf("/fakedev/%s %d %d %d", d.diskName, d.pno, d.partStart*uint64(d.ss), wantBytes)
				if len(d.blkpgCalls) != 1 || d.blkpgCalls[0] != wantCall {
					t.Errorf("BLKPG calls: got %q, want [%q]", d.blkpgCalls, wantCall)
				}
			}
			if len(d.fsCalls) != 1 || d.fsCalls[0] != wantBytes/4096 {
				t.Errorf("EXT4_IOC_RESIZE_FS calls: got %v, want [%d]", d.fsCalls, wantBytes/4096)
			}
			if !res.Changed || res.NewBytes != wantBytes/4096*4096 {
				t.Errorf("result: got %+v, want changed, NewBytes %d", res, wantBytes/4096*4096)
			}

			// A second run finds nothing to do and writes nothing.
			before := testutil.SHA256File(t, d.path)
			out.Reset()
			d.blkpgCalls, d.fsCalls = nil, nil
			res, err = Run(d.options(t), &out)
			if err != nil {
				t.Fatalf("second run: %v\n%s", err, out.String())
			}
			if res.Changed || len(d.blkpgCalls)+len(d.fsCalls) > 0 || !strings.Contains(out.String(), "nothing to do: / already fills") {
				t.Errorf("second run: changed %v, calls %v %v, output:\n%s", res.Changed, d.blkpgCalls, d.fsCalls, out.String())
			}
			if testutil.SHA256File(t, d.path) != before {
				t.Error("second run changed the image")
			}
		})
	}
}

func TestLeftAlone(t *testing.T) {
	tests := []struct {
		name string
		spec diskSpec
		want error
	}{
		{"gpt partition not last", diskSpec{label: "gpt", script: "start=2048,size=32MiB\nstart=67584\n", sizeMiB: 64}, ErrNotLast},
		{"mbr partition not last", diskSpec{label: "dos", script: "start=2048,size=32MiB\nstart=67584\n", sizeMiB: 64}, ErrNotLast},
		{"mbr partition 2 before 1", diskSpec{label: "dos", script: "start=67584\nstart=2048,size=32MiB\n", pno: 2, sizeMiB: 64}, ErrNotLast},
		{"not ext4", diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64, noFS: true}, ErrNotExt4},
		{"mbr logical partition", diskSpec{label: "dos", script: "start=2048,type=5\nstart=4096\n", pno: 5, sizeMiB: 64}, ErrUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newTestDisk(t, tt.spec)
			before := testutil.SHA256File(t, d.path)
			for _, dry := range []bool{true, false} {
				opts := d.options(t)
				opts.DryRun = dry
				var out bytes.Buffer
				_, err := Run(opts, &out)
				if !errors.Is(err, tt.want) || !errors.Is(err, ErrLeftAlone) {
					t.Errorf("dry-run %v: got %v, want %v\n%s", dry, err, tt.want, out.String())
				}
			}
			if testutil.SHA256File(t, d.path) != before || len(d.blkpgCalls)+len(d.fsCalls) > 0 {
				t.Errorf("image changed or ioctls called (%v %v)", d.blkpgCalls, d.fsCalls)
			}
		})
	}
}

// TestNotGrown: fresh images of sfdisk and sgdisk on a disk that was not
// enlarged need nothing and get no write.
func TestNotGrown(t *testing.T) {
	for _, label := range []string{"gpt", "dos", "sgdisk"} {
		t.Run(label, func(t *testing.T) {
			d := newTestDisk(t, diskSpec{label: label, script: "start=2048\n", sizeMiB: 64, growTo: 64 * mib})
			before := testutil.SHA256File(t, d.path)
			var out bytes.Buffer
			res, err := Run(d.options(t), &out)
			if err != nil {
				t.Fatal(err)
			}
			if res.Changed || testutil.SHA256File(t, d.path) != before || len(d.blkpgCalls)+len(d.fsCalls) > 0 {
				t.Errorf("changed %v, calls %v %v, output:\n%s", res.Changed, d.blkpgCalls, d.fsCalls, out.String())
			}
		})
	}
}

func TestDryRun(t *testing.T) {
	d := newTestDisk(t, diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64})
	before := testutil.SHA256File(t, d.path)
	opts := d.options(t)
	opts.DryRun = true
	var out bytes.Buffer
	res, err := Run(opts, &out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"gpt: would grow partition 1", "kernel: would resize", "ext4: would grow", "dry run: nothing written"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if !res.Changed || testutil.SHA256File(t, d.path) != before || len(d.blkpgCalls)+len(d.fsCalls) > 0 {
		t.Errorf("dry run wrote: changed %v, calls %v %v", res.Changed, d.blkpgCalls, d.fsCalls)
	}
}

// TestMBRLimit grows an MBR partition on a sparse 3 TiB disk: it must stop
// at sector 2^32-1 and say so.
func TestMBRLimit(t *testing.T) {
	d := newTestDisk(t, diskSpec{label: "dos", script: "start=2048\n", sizeMiB: 64, growTo: 3 << 40})
	var out bytes.Buffer
	_, err := Run(d.options(t), &out)
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	d.checkTable(t, "dos", 1<<32-1)
	if !strings.Contains(out.String(), "MBR limit") {
		t.Errorf("output does not mention the MBR limit:\n%s", out.String())
	}
	if want := uint64(1<<32-2048) * 512 / 4096; len(d.fsCalls) != 1 || d.fsCalls[0] != want {
		t.Errorf("EXT4_IOC_RESIZE_FS: got %v, want [%d]", d.fsCalls, want)
	}
}

// TestGPTLarge grows a GPT on a sparse 3 TiB disk past the MBR limit; the
// protective MBR saturates at 0xffffffff sectors.
func TestGPTLarge(t *testing.T) {
	d := newTestDisk(t, diskSpec{label: "gpt", script: "start=2048\n", sizeMiB: 64, growTo: 3 << 40})
	var out bytes.Buffer
	if _, err := Run(d.options(t), &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	d.checkTable(t, "gpt", (uint64(3<<40)/512-33)/2048*2048-1)
}

// TestCrashSafety cuts the power after each write of a GPT grow in turn and
// checks that the next run finishes the job with the same result as an
// uncut run, and that in between the reference tools still read a table.
func TestCrashSafety(t *testing.T) {
	for _, label := range []string{"gpt", "dos"} {
		spec := diskSpec{label: label, script: "start=2048\n", sizeMiB: 64}
		tmpl := newTestDisk(t, spec)
		ref := tmpl.clone(t)
		if _, err := Run(ref.options(t), io.Discard); err != nil {
			t.Fatal(err)
		}
		want := testutil.SHA256File(t, ref.path)
		for cut := 0; ; cut++ {
			d := tmpl.clone(t)
			opts := d.options(t)
			open := opts.Open
			n := cut
			opts.Open = func(path string, write bool) (Device, error) {
				dev, err := open(path, write)
				return cutDevice{dev, &n}, err
			}
			var out bytes.Buffer
			_, err := Run(opts, &out)
			if err == nil {
				if cut == 0 {
					t.Fatalf("%s: a run without any write succeeded", label)
				}
				t.Logf("%s: %d writes in all", label, cut)
				break
			}
			if !errors.Is(err, errPowerCut) {
				t.Fatalf("%s cut after %d writes: got %v, want the power cut", label, cut, err)
			}
			// The interrupted disk still has a table sfdisk reads, with the
			// partition either old or grown, and for GPT a valid primary
			// header and entry array: the Linux kernel reads nothing else.
			sfdiskPart(t, d.path, 1)
			if label == "gpt" {
				f, err := os.Open(d.path)
				if err != nil {
					t.Fatal(err)
				}
				if _, _, err := readGPT(f, 512, 1); err != nil {
					t.Errorf("gpt cut after %d writes: primary GPT invalid: %v", cut, err)
				}
				f.Close()
			}
			out.Reset()
			if _, err := Run(d.options(t), &out); err != nil {
				t.Fatalf("%s cut after %d writes: rerun: %v\n%s", label, cut, err, out.String())
			}
			if testutil.SHA256File(t, d.path) != want {
				t.Errorf("%s cut after %d writes: rerun result differs from an uncut run\n%s", label, cut, out.String())
			}
			if label == "gpt" {
				d.checkTable(t, label, (uint64(d.size)/512-33)/2048*2048-1)
			}
			if cut > 10 {
				t.Fatal("BUG: more writes than expected")
			}
		}
	}
}

// clone copies the image (sparse) and gives it a fresh fake sysfs.
func (d *testDisk) clone(t *testing.T) *testDisk {
	t.Helper()
	c := *d
	c.blkpgCalls, c.fsCalls = nil, nil
	c.path = filepath.Join(t.TempDir(), "disk.img")
	run(t, "cp", "--sparse=always", d.path, c.path)
	naming := map[string]string{"vda": "virtio", "sda": "scsi", "nvme0n1": "nvme", "xvda": "xen"}[d.diskName]
	c.fakeSysfs(t, naming)
	return &c
}
