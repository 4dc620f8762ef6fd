package resize

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// location is where a mounted file system lives, as sysfs says.
type location struct {
	majMin     string // "252:1"
	partName   string // "vda1", "nvme0n1p1": from uevent DEVNAME, never parsed
	diskName   string // "vda", "nvme0n1"
	pno        int    // partition number (sysfs "partition")
	partStart  uint64 // in 512-byte units (sysfs "start")
	partSize   uint64 // in 512-byte units (sysfs "size"), the kernel's current view
	diskSize   uint64 // in 512-byte units
	sectorSize int    // logical block size of the disk
	sysPart    string // resolved sysfs directory of the partition
}

func readSysfs(dir, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	return strings.TrimSpace(string(b)), err
}

func readSysfsUint(dir, name string) (uint64, error) {
	s, err := readSysfs(dir, name)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("resize: %s/%s: got %q, want a number", dir, name, s)
	}
	return v, nil
}

// devName is the node name under /dev: uevent's DEVNAME, else the directory name.
func devName(dir string) string {
	if s, err := readSysfs(dir, "uevent"); err == nil {
		for _, l := range strings.Split(s, "\n") {
			if v, ok := strings.CutPrefix(l, "DEVNAME="); ok {
				return v
			}
		}
	}
	return filepath.Base(dir)
}

// locate resolves a block device number to its partition and disk through
// sysfs (sysfsRoot/dev/block/MAJ:MIN -> .../block/DISK/PART).
func locate(sysfsRoot string, major, minor uint32) (*location, error) {
	mm := fmt.Sprintf("%d:%d", major, minor)
	link := filepath.Join(sysfsRoot, "dev", "block", mm)
	dir, err := filepath.EvalSymlinks(link)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, fmt.Errorf("%w: device %s has no %s (not a block device: btrfs, overlay, tmpfs or a network file system?)", ErrUnsupported, mm, link)
		}
		return nil, fmt.Errorf("resize: %w", err)
	}
	name := devName(dir)
	if err := checkPartition(dir, name, mm); err != nil {
		return nil, err
	}
	loc := &location{majMin: mm, partName: name, sysPart: dir}
	pno, err := readSysfsUint(dir, "partition")
	if err != nil {
		return nil, err
	}
	loc.pno = int(pno)
	if loc.partStart, err = readSysfsUint(dir, "start"); err != nil {
		return nil, err
	}
	if loc.partSize, err = readSysfsUint(dir, "size"); err != nil {
		return nil, err
	}
	if err := loc.readDisk(filepath.Dir(dir)); err != nil {
		return nil, err
	}
	return loc, nil
}

// checkPartition returns nil if the block device at sysfs directory dir is
// a partition of a disk, else why it is left alone: device-mapper, md or
// a whole disk.
func checkPartition(dir, name, mm string) error {
	if _, err := os.Stat(filepath.Join(dir, "dm")); err == nil {
		dmName, err := readSysfs(filepath.Join(dir, "dm"), "name")
		if err != nil {
			dmName = fmt.Sprintf("(name unreadable: %v)", err)
		}
		return fmt.Errorf("%w: %s (%s) is a device-mapper device (LVM, LUKS or multipath %q); grow the layers below it yourself", ErrStacked, name, mm, dmName)
	} else if !os.IsNotExist(err) {
		return fmt.Errorf("resize: %w", err)
	}
	slaves, err := os.ReadDir(filepath.Join(dir, "slaves"))
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("resize: %w", err)
	}
	if len(slaves) > 0 {
		return fmt.Errorf("%w: %s (%s) is stacked on %s (md RAID or similar)", ErrStacked, name, mm, slaves[0].Name())
	}
	if _, err := os.Stat(filepath.Join(dir, "partition")); os.IsNotExist(err) {
		return fmt.Errorf("%w: %s (%s) is a whole disk, not a partition", ErrWholeDisk, name, mm)
	} else if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	return nil
}

// readDisk reads the name, size and sector size of the disk at sysfs
// directory disk.
func (loc *location) readDisk(disk string) error {
	loc.diskName = devName(disk)
	var err error
	if loc.diskSize, err = readSysfsUint(disk, "size"); err != nil {
		return fmt.Errorf("resize: parent of %s: %w", loc.sysPart, err)
	}
	loc.sectorSize = 512 // without queue/logical_block_size
	v, err := readSysfsUint(disk, "queue/logical_block_size")
	switch {
	case os.IsNotExist(err):
	case err != nil:
		return fmt.Errorf("resize: %w", err)
	case v != 512 && v != 1024 && v != 2048 && v != 4096:
		return fmt.Errorf("%w: logical block size of %s got %d, want 512..4096", ErrUnsupported, loc.diskName, v)
	default:
		loc.sectorSize = int(v)
	}
	return nil
}
