package resize

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestLocate checks device discovery on fake sysfs trees shaped like the
// kernel's, including setups that must be left alone.
func TestLocate(t *testing.T) {
	type file struct{ path, val string }
	type link struct{ path, target string }
	tests := []struct {
		name         string
		files        []file
		links        []link
		major, minor uint32
		want         error
		wantPart     string
		wantDisk     string
		wantPno      int
		wantSS       int
	}{
		{
			name: "nvme0n1p2 (names are not parsed)",
			files: []file{
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/size", "104857600"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/uevent", "MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\nDEVTYPE=disk"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/queue/logical_block_size", "4096"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2/partition", "2"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2/start", "1050624"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2/size", "4194304"},
				{"devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2/uevent", "MAJOR=259\nMINOR=2\nDEVNAME=nvme0n1p2\nDEVTYPE=partition"},
			},
			links: []link{{"dev/block/259:2", "../../devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2"}},
			major: 259, minor: 2,
			wantPart: "nvme0n1p2", wantDisk: "nvme0n1", wantPno: 2, wantSS: 4096,
		},
		{
			name: "no uevent: directory names",
			files: []file{
				{"devices/vbd-51712/block/xvda/size", "1000"},
				{"devices/vbd-51712/block/xvda/xvda1/partition", "1"},
				{"devices/vbd-51712/block/xvda/xvda1/start", "2048"},
				{"devices/vbd-51712/block/xvda/xvda1/size", "100"},
			},
			links: []link{{"dev/block/202:1", "../../devices/vbd-51712/block/xvda/xvda1"}},
			major: 202, minor: 1,
			wantPart: "xvda1", wantDisk: "xvda", wantPno: 1, wantSS: 512,
		},
		{
			name: "dm-0 (LUKS)",
			files: []file{
				{"devices/virtual/block/dm-0/size", "1000"},
				{"devices/virtual/block/dm-0/dm/name", "cryptroot"},
				{"devices/virtual/block/dm-0/uevent", "MAJOR=254\nMINOR=0\nDEVNAME=dm-0"},
				{"devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda2/partition", "2"},
			},
			links: []link{
				{"dev/block/254:0", "../../devices/virtual/block/dm-0"},
				{"devices/virtual/block/dm-0/slaves/vda2", "../../../../pci0000:00/0000:00:04.0/virtio1/block/vda/vda2"},
			},
			major: 254, minor: 0, want: ErrStacked,
		},
		{
			name: "md0",
			files: []file{
				{"devices/virtual/block/md0/size", "1000"},
				{"devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda1/partition", "1"},
			},
			links: []link{
				{"dev/block/9:0", "../../devices/virtual/block/md0"},
				{"devices/virtual/block/md0/slaves/vda1", "../../../../pci0000:00/0000:00:04.0/virtio1/block/vda/vda1"},
			},
			major: 9, minor: 0, want: ErrStacked,
		},
		{
			name:  "whole disk",
			files: []file{{"devices/pci0000:00/0000:00:04.0/virtio1/block/vda/size", "1000"}},
			links: []link{{"dev/block/252:0", "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda"}},
			major: 252, minor: 0, want: ErrWholeDisk,
		},
		{
			name:  "not a block device (overlay, btrfs)",
			files: []file{{"dev/block/.keep", ""}},
			major: 0, minor: 31, want: ErrUnsupported,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tt.files {
				p := filepath.Join(root, f.path)
				os.MkdirAll(filepath.Dir(p), 0o755)
				if err := os.WriteFile(p, []byte(f.val+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			for _, l := range tt.links {
				p := filepath.Join(root, l.path)
				os.MkdirAll(filepath.Dir(p), 0o755)
				if err := os.Symlink(l.target, p); err != nil {
					t.Fatal(err)
				}
			}
			loc, err := locate(root, tt.major, tt.minor)
			if tt.want != nil {
				if !errors.Is(err, tt.want) || !errors.Is(err, ErrLeftAlone) {
					t.Fatalf("got %v, want %v", err, tt.want)
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if loc.partName != tt.wantPart || loc.diskName != tt.wantDisk || loc.pno != tt.wantPno || loc.sectorSize != tt.wantSS {
				t.Errorf("got %s of %s, partition %d, %d-byte sectors; want %s of %s, partition %d, %d",
					loc.partName, loc.diskName, loc.pno, loc.sectorSize, tt.wantPart, tt.wantDisk, tt.wantPno, tt.wantSS)
			}
		})
	}
}
