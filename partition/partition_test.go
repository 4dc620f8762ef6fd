package partition

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

func TestNewPlan(t *testing.T) {
	for _, tc := range []struct {
		layout           Layout
		root             int64
		wantRoot         Extent
		wantDisk         int64
		wantESP, wantBIO Extent
	}{
		{Legacy, 100 * MiB, Extent{MiB, 100 * MiB}, 101 * MiB, Extent{}, Extent{}},
		{Legacy, 100*MiB + 1, Extent{MiB, 101 * MiB}, 102 * MiB, Extent{}, Extent{}},
		{LegacyGPT, 100 * MiB, Extent{2 * MiB, 100 * MiB}, 103 * MiB, Extent{}, Extent{MiB, MiB}},
		{EFI, 100 * MiB, Extent{513 * MiB, 100 * MiB}, 614 * MiB, Extent{MiB, 512 * MiB}, Extent{}},
		{Hybrid, 100 * MiB, Extent{514 * MiB, 100 * MiB}, 615 * MiB, Extent{2 * MiB, 512 * MiB}, Extent{MiB, MiB}},
	} {
		t.Run(string(tc.layout), func(t *testing.T) {
			p, err := NewPlan(tc.layout, tc.root, 0)
			if err != nil {
				t.Fatal(err)
			}
			if p.Root != tc.wantRoot || p.DiskSize != tc.wantDisk || p.ESP != tc.wantESP || p.BIOSBoot != tc.wantBIO {
				t.Errorf("got %+v, want root %+v disk %d esp %+v bios %+v", p, tc.wantRoot, tc.wantDisk, tc.wantESP, tc.wantBIO)
			}
		})
	}
	if _, err := NewPlan("gpt", MiB, 0); !errors.Is(err, ErrLayout) {
		t.Errorf("unknown layout: got %v, want ErrLayout", err)
	}
	if _, err := NewPlan(Legacy, 3<<40, 0); !errors.Is(err, ErrTooLarge) {
		t.Errorf("3 TiB MBR: got %v, want ErrTooLarge", err)
	}
	if _, err := NewPlan(EFI, MiB, 64*MiB); err == nil || !strings.Contains(err.Error(), "at least 512 MiB") {
		t.Errorf("64 MiB ESP: got %v, want an error naming the minimum", err)
	}
}

// sfdiskJSON is the part of `sfdisk --json` we check.
type sfdiskJSON struct {
	PartitionTable struct {
		Label      string `json:"label"`
		ID         string `json:"id"`
		Partitions []struct {
			Node  string `json:"node"`
			Start int64  `json:"start"`
			Size  int64  `json:"size"`
			Type  string `json:"type"`
			UUID  string `json:"uuid"`
			Name  string `json:"name"`
		} `json:"partitions"`
	} `json:"partitiontable"`
}

func writeDisk(t *testing.T, layout Layout, seed string) (string, *Plan) {
	t.Helper()
	p, err := NewPlan(layout, 64*MiB, 0)
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(p.DiskSize); err != nil {
		t.Fatal(err)
	}
	ids := DeriveIDs([]byte(seed))
	if err := p.WriteTable(f, ids); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteESP(f, ids); err != nil {
		t.Fatal(err)
	}
	return name, p
}

func TestWriteTableReferenceTools(t *testing.T) {
	tools := testutil.NeedTool(t, "sfdisk", "sgdisk", "fsck.vfat")
	sfdisk, sgdisk, fsckVfat := tools[0], tools[1], tools[2]
	for _, layout := range Layouts {
		t.Run(string(layout), func(t *testing.T) {
			name, p := writeDisk(t, layout, "seed")
			out, err := exec.Command(sfdisk, "--json", name).Output()
			if err != nil {
				t.Fatalf("sfdisk --json: %v", err)
			}
			var got sfdiskJSON
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatal(err)
			}
			wantLabel := "dos"
			if layout.GPT() {
				wantLabel = "gpt"
			}
			if got.PartitionTable.Label != wantLabel {
				t.Errorf("label: got %q, want %q", got.PartitionTable.Label, wantLabel)
			}
			parts := p.Partitions()
			if len(got.PartitionTable.Partitions) != len(parts) {
				t.Fatalf("partitions: got %d, want %d: %s", len(got.PartitionTable.Partitions), len(parts), out)
			}
			for i, gp := range got.PartitionTable.Partitions {
				if gp.Start*SectorSize != parts[i].Start || gp.Size*SectorSize != parts[i].Size {
					t.Errorf("partition %d: got start %d size %d sectors, want %+v", i+1, gp.Start, gp.Size, parts[i].Extent)
				}
			}
			root := got.PartitionTable.Partitions[len(parts)-1]
			if layout.GPT() {
				if root.Type != "0FC63DAF-8483-4772-8E79-3D69D8477DE4" || root.Name != "nixos" {
					t.Errorf("root: got type %s name %q", root.Type, root.Name)
				}
				if out, err := exec.Command(sgdisk, "-v", name).CombinedOutput(); err != nil || !strings.Contains(string(out), "No problems found") {
					t.Errorf("sgdisk -v: %v\n%s", err, out)
				}
			} else if root.Type != "83" {
				t.Errorf("root type: got %s, want 83", root.Type)
			}
			if layout.HasESP() {
				esp := got.PartitionTable.Partitions[len(parts)-2]
				if esp.Type != "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" {
					t.Errorf("ESP type: got %s", esp.Type)
				}
				espFile := filepath.Join(t.TempDir(), "esp")
				data := make([]byte, p.ESP.Size)
				f, _ := os.Open(name)
				f.ReadAt(data, p.ESP.Start)
				f.Close()
				os.WriteFile(espFile, data, 0o600)
				if out, err := exec.Command(fsckVfat, "-n", espFile).CombinedOutput(); err != nil {
					t.Errorf("fsck.vfat -n: %v\n%s", err, out)
				}
			}
		})
	}
}

func TestDeterministic(t *testing.T) {
	for _, layout := range Layouts {
		a, _ := writeDisk(t, layout, "seed")
		b, _ := writeDisk(t, layout, "seed")
		c, _ := writeDisk(t, layout, "other")
		da, _ := os.ReadFile(a)
		db, _ := os.ReadFile(b)
		dc, _ := os.ReadFile(c)
		if !bytes.Equal(da, db) {
			t.Errorf("%s: two disks from one seed differ", layout)
		}
		if bytes.Equal(da, dc) {
			t.Errorf("%s: disks from different seeds are equal: identifiers are not derived from the seed", layout)
		}
	}
}

// TestESPLabelTime checks that no wall-clock time reaches the ESP: go-diskfs
// stamps the volume label entry with time.Now(), which we overwrite.
func TestESPLabelTime(t *testing.T) {
	name, p := writeDisk(t, EFI, "seed")
	disk, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	esp := disk[p.ESP.Start:]
	spf := int64(esp[36]) | int64(esp[37])<<8 | int64(esp[38])<<16 | int64(esp[39])<<24
	root := esp[(32+2*spf)*SectorSize:]
	found := false
	for off := 0; off < 4096 && root[off] != 0; off += 32 {
		e := root[off : off+32]
		if e[11]&0x08 == 0 || e[11] == 0x0f {
			continue
		}
		found = true
		if string(e[:3]) != "ESP" {
			t.Errorf("label entry: got %q, want ESP", e[:11])
		}
		for _, f := range []int{14, 16, 18, 22, 24} {
			got := int(e[f]) | int(e[f+1])<<8
			want := 0
			if f == 16 || f == 18 || f == 24 {
				want = 0x21
			}
			if got != want {
				t.Errorf("label entry field at %d: got %#x, want %#x", f, got, want)
			}
		}
	}
	if !found {
		t.Fatal("no volume label entry in the ESP root directory")
	}
}
