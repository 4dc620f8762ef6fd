// Package resize grows the partition holding a mounted ext4 file system to
// the end of its disk, tells the kernel, and grows the file system online.
// It is the logic behind cmd/nixvm-resize, run at a guest's first boot (and
// harmlessly on every later one).
//
// Steps, each skipped when already done, so a run is idempotent and a run cut
// short is finished by the next one:
//
//  1. Find the device: stat(mountpoint).st_dev, then sysfs
//     /sys/dev/block/MAJ:MIN -> .../block/DISK/PART, its "partition", "start"
//     and "size" files and the parent directory (the disk). Device names are
//     never parsed, so vda1, sda1, nvme0n1p1, xvda1 and mmcblk0p1 are all alike.
//  2. Grow the partition in the on-disk table: GPT (backup header and entries
//     moved to the new end, CRCs of headers and entry arrays recomputed,
//     protective MBR updated) or MBR (primary partitions, within the 2^32-sector
//     limit). See applyGPT for the write order that makes this crash-safe.
//  3. Tell the kernel with BLKPG_RESIZE_PARTITION, which works while the
//     partition is mounted (BLKRRPART does not).
//  4. Grow ext4 with EXT4_IOC_RESIZE_FS (needs CAP_SYS_RESOURCE).
//
// Left alone, touching nothing (errors wrapping ErrLeftAlone): a file system
// on device-mapper (LVM, LUKS) or md, on a whole disk without a partition
// table, on a partition that is not the last one on its disk, on a logical
// MBR partition, or a file system other than ext2/3/4.
//
// Where the partition ends: GPT, like sfdisk, on the last 1 MiB boundary
// before the backup entries and header (the 33 sectors at the end, plus up
// to 1 MiB - 1 sector left free); MBR, like sfdisk, on the disk's last sector,
// or sector 2^32-1 when the disk is bigger (2 TiB with 512-byte sectors).
//
// Limits: GPT and MBR only (no logical MBR partitions). 4096-byte-sector
// disks are tested in the QEMU guest only (Debian 12's sfdisk cannot make
// them in files). An ext4 without the 64bit feature stops at 2^32-1 blocks.
package resize

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

var (
	// ErrLeftAlone marks setups that nixvm-resize does not handle by design.
	// Nothing has been written when it is returned.
	ErrLeftAlone = errors.New("left alone")
	// ErrStacked: the file system is on device-mapper (LVM, LUKS) or md.
	ErrStacked = fmt.Errorf("%w: stacked block device", ErrLeftAlone)
	// ErrWholeDisk: the file system is on a whole disk, not a partition.
	ErrWholeDisk = fmt.Errorf("%w: whole disk", ErrLeftAlone)
	// ErrNotLast: another partition follows the file system's partition.
	ErrNotLast = fmt.Errorf("%w: partition is not the last one", ErrLeftAlone)
	// ErrNotExt4: the file system is not ext2/3/4.
	ErrNotExt4 = fmt.Errorf("%w: not ext4", ErrLeftAlone)
	// ErrNoTable: no GPT or MBR on the disk.
	ErrNoTable = fmt.Errorf("%w: no GPT or MBR partition table", ErrLeftAlone)
	// ErrUnsupported: anything else outside the supported setups.
	ErrUnsupported = fmt.Errorf("%w: unsupported setup", ErrLeftAlone)

	// ErrCorruptTable: the partition table is damaged or disagrees with the
	// kernel. This is a real error, not a setup to leave alone.
	ErrCorruptTable = errors.New("resize: partition table is damaged")
)

// Options configure Run. The zero value grows "/" on the running system; the
// function fields are seams for tests (fake sysfs trees, image files, and
// recorded ioctls).
type Options struct {
	Mountpoint string // file system to grow; "" means "/"
	DryRun     bool   // print the steps, write nothing, call no ioctl

	SysfsRoot string // "" means "/sys"
	DevRoot   string // "" means "/dev"

	// StatDev returns the device number of the file system holding path.
	StatDev func(path string) (major, minor uint32, err error)
	// Open opens a device node (disk or partition), writable if write.
	Open func(path string, write bool) (Device, error)
	// ResizePartition tells the kernel the new partition size
	// (BLKPG_RESIZE_PARTITION on the disk); start and length in bytes.
	ResizePartition func(diskPath string, pno int, start, length int64) error
	// ResizeFS grows the ext4 mounted at mountpoint to blocks blocks
	// (EXT4_IOC_RESIZE_FS).
	ResizeFS func(mountpoint string, blocks uint64) error
}

func (o *Options) defaults() {
	if o.Mountpoint == "" {
		o.Mountpoint = "/"
	}
	if o.SysfsRoot == "" {
		o.SysfsRoot = "/sys"
	}
	if o.DevRoot == "" {
		o.DevRoot = "/dev"
	}
	if o.StatDev == nil {
		o.StatDev = statDev
	}
	if o.Open == nil {
		o.Open = openDevice
	}
	if o.ResizePartition == nil {
		o.ResizePartition = blkpgResize
	}
	if o.ResizeFS == nil {
		o.ResizeFS = ext4Resize
	}
}

// Result says what Run found and did.
type Result struct {
	Partition string // partition device, e.g. /dev/vda1
	Disk      string // disk device, e.g. /dev/vda
	Table     string // "gpt" or "mbr"
	OldBytes  uint64 // file system size before
	NewBytes  uint64 // file system size after (or planned, with DryRun)
	Changed   bool   // something was (or, with DryRun, would be) written
}

func openDevice(path string, write bool) (Device, error) {
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil || !write {
		return f, err
	}
	// systemd-udevd does not probe a whole disk while someone holds a BSD
	// lock on it, so it will not re-read the table under our feet (growpart
	// takes the same lock). Released by Close.
	if err := lockExclusive(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// Run grows the file system at opts.Mountpoint to the end of its disk,
// printing one line per step to out.
func Run(opts Options, out io.Writer) (res *Result, err error) {
	opts.defaults()
	t0 := time.Now()
	would := ""
	if opts.DryRun {
		would = "would "
	}
	say := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }

	major, minor, err := opts.StatDev(opts.Mountpoint)
	if err != nil {
		return nil, fmt.Errorf("resize: %s: %w", opts.Mountpoint, err)
	}
	loc, err := locate(opts.SysfsRoot, major, minor)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opts.Mountpoint, err)
	}
	res = &Result{
		Partition: filepath.Join(opts.DevRoot, loc.partName),
		Disk:      filepath.Join(opts.DevRoot, loc.diskName),
	}
	say("%s is on %s (%s), partition %d of %s (%s, %d-byte sectors)",
		opts.Mountpoint, res.Partition, loc.majMin, loc.pno, res.Disk, human(loc.diskSize*512), loc.sectorSize)

	// Read everything before writing anything: a setup we leave alone must
	// see no write at all.
	part, err := opts.Open(res.Partition, false)
	if err != nil {
		return res, fmt.Errorf("resize: open %s: %w", res.Partition, err)
	}
	sb, err := readExt4Super(part)
	part.Close()
	if err != nil {
		return res, fmt.Errorf("%s on %s: %w", opts.Mountpoint, res.Partition, err)
	}
	res.OldBytes, res.NewBytes = sb.blocks*sb.blockSize, sb.blocks*sb.blockSize

	disk, err := opts.Open(res.Disk, !opts.DryRun)
	if err != nil {
		return res, fmt.Errorf("resize: open %s: %w", res.Disk, err)
	}
	defer func() {
		if cerr := disk.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("resize: close %s: %w", res.Disk, cerr)
		}
	}()
	ss := uint64(loc.sectorSize)
	diskSectors := loc.diskSize * 512 / ss
	p, err := planTable(disk, loc.sectorSize, diskSectors, loc.pno)
	if err != nil {
		return res, fmt.Errorf("%s: %w", res.Disk, err)
	}
	res.Table = p.table
	if p.start*ss != loc.partStart*512 {
		return res, fmt.Errorf("%w: %s: the kernel has partition %d at byte %d, the %s table at byte %d; reboot or fix the table",
			ErrCorruptTable, res.Disk, loc.pno, loc.partStart*512, p.table, p.start*ss)
	}

	// Step 1: the partition table.
	if p.upToDate() {
		say("%s: partition %d already ends at sector %d, nothing to do", p.table, p.pno, p.oldEnd)
	} else {
		res.Changed = true
		for _, f := range p.tableFixes {
			say("%s: %s%s", p.table, would, f)
		}
		if p.newEnd != p.oldEnd {
			say("%s: %sgrow partition %d from sectors %d-%d (%s) to %d-%d (%s), %s", p.table, would, p.pno,
				p.start, p.oldEnd, human((p.oldEnd-p.start+1)*ss), p.start, p.newEnd, human((p.newEnd-p.start+1)*ss), p.note)
		}
		if !opts.DryRun {
			if err := p.apply(disk, say); err != nil {
				return res, err
			}
		}
	}

	// Step 2: the kernel's idea of the partition.
	tableBytes := (p.newEnd - p.start + 1) * ss
	if kernelBytes := loc.partSize * 512; kernelBytes < tableBytes {
		res.Changed = true
		say("kernel: %sresize %s from %s to %s (BLKPG_RESIZE_PARTITION on %s)", would, res.Partition, human(kernelBytes), human(tableBytes), res.Disk)
		if !opts.DryRun {
			if err := opts.ResizePartition(res.Disk, loc.pno, int64(p.start*ss), int64(tableBytes)); err != nil {
				return res, fmt.Errorf("resize: BLKPG_RESIZE_PARTITION %s partition %d: %w", res.Disk, loc.pno, err)
			}
		}
	} else {
		say("kernel: %s is already %s, nothing to do", res.Partition, human(kernelBytes))
	}

	// Step 3: the file system.
	newBlocks := tableBytes / sb.blockSize
	if !sb.is64bit && newBlocks > ext4MaxBlocks32 {
		say("ext4: without the 64bit feature the file system stops at %d blocks (%s)", uint64(ext4MaxBlocks32), human(ext4MaxBlocks32*sb.blockSize))
		newBlocks = ext4MaxBlocks32
	}
	if newBlocks <= sb.blocks {
		say("ext4: %s already has %d blocks of %d bytes (%s), nothing to do", opts.Mountpoint, sb.blocks, sb.blockSize, human(res.OldBytes))
	} else {
		res.Changed = true
		res.NewBytes = newBlocks * sb.blockSize
		say("ext4: %sgrow %s from %d to %d blocks of %d bytes (%s to %s, EXT4_IOC_RESIZE_FS)", would, opts.Mountpoint,
			sb.blocks, newBlocks, sb.blockSize, human(res.OldBytes), human(res.NewBytes))
		if !opts.DryRun {
			if err := opts.ResizeFS(opts.Mountpoint, newBlocks); err != nil {
				return res, fmt.Errorf("resize: EXT4_IOC_RESIZE_FS %s to %d blocks: %w", opts.Mountpoint, newBlocks, err)
			}
			if err := verifyBlocks(opts, res.Partition, newBlocks); err != nil {
				return res, err
			}
		}
	}
	switch {
	case opts.DryRun:
		say("dry run: nothing written")
	case res.Changed:
		say("done: %s grew from %s to %s in %s", opts.Mountpoint, human(res.OldBytes), human(res.NewBytes), time.Since(t0).Round(time.Millisecond))
	default:
		say("nothing to do: %s already fills %s", opts.Mountpoint, res.Disk)
	}
	return res, nil
}

func verifyBlocks(opts Options, partPath string, want uint64) error {
	part, err := opts.Open(partPath, false)
	if err != nil {
		return fmt.Errorf("resize: open %s: %w", partPath, err)
	}
	defer part.Close()
	sb, err := readExt4Super(part)
	if err != nil {
		return fmt.Errorf("resize: after growing: %w", err)
	}
	if sb.blocks != want {
		return fmt.Errorf("resize: after EXT4_IOC_RESIZE_FS, %s has %d blocks, want %d", partPath, sb.blocks, want)
	}
	return nil
}
