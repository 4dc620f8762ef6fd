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

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
	"github.com/nixvm-image/nixvm-image/internal/units"
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
		return nil, errors.Join(fmt.Errorf("lock %s: %w", path, err), f.Close())
	}
	return f, nil
}

// Run grows the file system at opts.Mountpoint to the end of its disk,
// printing one line per step to out.
func Run(opts Options, out io.Writer) (res *Result, err error) {
	opts.defaults()
	r := &runner{opts: opts, t0: time.Now(), say: func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }}
	if opts.DryRun {
		r.would = "would "
	}
	if err := r.locate(); err != nil {
		return nil, err
	}
	// Read everything before writing anything: a setup we leave alone must
	// see no write at all.
	if r.sb, err = readPartitionSuper(opts, r.res.Partition); err != nil {
		return r.res, fmt.Errorf("%s on %s: %w", opts.Mountpoint, r.res.Partition, err)
	}
	r.res.OldBytes = r.sb.BlocksCount * uint64(r.sb.BlockSize())
	r.res.NewBytes = r.res.OldBytes
	disk, err := opts.Open(r.res.Disk, !opts.DryRun)
	if err != nil {
		return r.res, fmt.Errorf("resize: open %s: %w", r.res.Disk, err)
	}
	defer closeDevice(disk, r.res.Disk, &err)
	if err := r.planTable(disk); err != nil {
		return r.res, err
	}
	for _, step := range []func(Device) error{r.growTable, r.growKernel, r.growFS} {
		if err := step(disk); err != nil {
			return r.res, err
		}
	}
	r.summary()
	return r.res, nil
}

// runner is one Run: what it found so far and how it reports.
type runner struct {
	opts  Options
	t0    time.Time
	say   func(format string, args ...any)
	would string // "would " with DryRun

	res *Result
	loc *location
	sb  *ondisk.Superblock
	p   *plan
	ss  uint64 // logical sector size
}

// locate finds the partition and disk under the mount point.
func (r *runner) locate() error {
	major, minor, err := r.opts.StatDev(r.opts.Mountpoint)
	if err != nil {
		return fmt.Errorf("resize: %s: %w", r.opts.Mountpoint, err)
	}
	loc, err := locate(r.opts.SysfsRoot, major, minor)
	if err != nil {
		return fmt.Errorf("%s: %w", r.opts.Mountpoint, err)
	}
	r.loc, r.ss = loc, uint64(loc.sectorSize)
	r.res = &Result{
		Partition: filepath.Join(r.opts.DevRoot, loc.partName),
		Disk:      filepath.Join(r.opts.DevRoot, loc.diskName),
	}
	r.say("%s is on %s (%s), partition %d of %s (%s, %d-byte sectors)",
		r.opts.Mountpoint, r.res.Partition, loc.majMin, loc.pno, r.res.Disk, human(loc.diskSize*512), loc.sectorSize)
	return nil
}

// planTable reads the disk's partition table and plans the growth; the
// table must agree with the kernel on where the partition starts.
func (r *runner) planTable(disk Device) error {
	diskSectors := r.loc.diskSize * 512 / r.ss
	p, err := planTable(disk, r.loc.sectorSize, diskSectors, r.loc.pno)
	if err != nil {
		return fmt.Errorf("%s: %w", r.res.Disk, err)
	}
	r.p, r.res.Table = p, p.table
	if p.start*r.ss != r.loc.partStart*512 {
		return fmt.Errorf("%w: %s: the kernel has partition %d at byte %d, the %s table at byte %d; reboot or fix the table",
			ErrCorruptTable, r.res.Disk, r.loc.pno, r.loc.partStart*512, p.table, p.start*r.ss)
	}
	return nil
}

// growTable is step 1: the partition table.
func (r *runner) growTable(disk Device) error {
	p := r.p
	if p.upToDate() {
		r.say("%s: partition %d already ends at sector %d, nothing to do", p.table, p.pno, p.oldEnd)
		return nil
	}
	r.res.Changed = true
	for _, f := range p.tableFixes {
		r.say("%s: %s%s", p.table, r.would, f)
	}
	if p.newEnd != p.oldEnd {
		r.say("%s: %sgrow partition %d from sectors %d-%d (%s) to %d-%d (%s), %s", p.table, r.would, p.pno,
			p.start, p.oldEnd, human((p.oldEnd-p.start+1)*r.ss), p.start, p.newEnd, human((p.newEnd-p.start+1)*r.ss), p.note)
	}
	if r.opts.DryRun {
		return nil
	}
	return p.apply(disk, r.say)
}

// tableBytes is the partition's size in the (grown) table.
func (r *runner) tableBytes() uint64 { return (r.p.newEnd - r.p.start + 1) * r.ss }

// growKernel is step 2: the kernel's idea of the partition.
func (r *runner) growKernel(Device) error {
	tableBytes, kernelBytes := r.tableBytes(), r.loc.partSize*512
	if kernelBytes >= tableBytes {
		r.say("kernel: %s is already %s, nothing to do", r.res.Partition, human(kernelBytes))
		return nil
	}
	r.res.Changed = true
	r.say("kernel: %sresize %s from %s to %s (BLKPG_RESIZE_PARTITION on %s)", r.would, r.res.Partition, human(kernelBytes), human(tableBytes), r.res.Disk)
	if r.opts.DryRun {
		return nil
	}
	if err := r.opts.ResizePartition(r.res.Disk, r.loc.pno, int64(r.p.start*r.ss), int64(tableBytes)); err != nil {
		return fmt.Errorf("resize: BLKPG_RESIZE_PARTITION %s partition %d: %w", r.res.Disk, r.loc.pno, err)
	}
	return nil
}

// growFS is step 3: the file system.
func (r *runner) growFS(Device) error {
	bs, blocks := uint64(r.sb.BlockSize()), r.sb.BlocksCount
	newBlocks := r.tableBytes() / bs
	if !r.sb.Is64Bit() && newBlocks > ext4MaxBlocks32 {
		r.say("ext4: without the 64bit feature the file system stops at %d blocks (%s)", uint64(ext4MaxBlocks32), human(ext4MaxBlocks32*bs))
		newBlocks = ext4MaxBlocks32
	}
	if newBlocks <= blocks {
		r.say("ext4: %s already has %d blocks of %d bytes (%s), nothing to do", r.opts.Mountpoint, blocks, bs, human(r.res.OldBytes))
		return nil
	}
	r.res.Changed = true
	r.res.NewBytes = newBlocks * bs
	r.say("ext4: %sgrow %s from %d to %d blocks of %d bytes (%s to %s, EXT4_IOC_RESIZE_FS)", r.would, r.opts.Mountpoint,
		blocks, newBlocks, bs, human(r.res.OldBytes), human(r.res.NewBytes))
	if r.opts.DryRun {
		return nil
	}
	if err := r.opts.ResizeFS(r.opts.Mountpoint, newBlocks); err != nil {
		return fmt.Errorf("resize: EXT4_IOC_RESIZE_FS %s to %d blocks: %w", r.opts.Mountpoint, newBlocks, err)
	}
	return verifyBlocks(r.opts, r.res.Partition, newBlocks)
}

// summary says what the run did.
func (r *runner) summary() {
	switch {
	case r.opts.DryRun:
		r.say("dry run: nothing written")
	case r.res.Changed:
		r.say("done: %s grew from %s to %s in %s", r.opts.Mountpoint, human(r.res.OldBytes), human(r.res.NewBytes), time.Since(r.t0).Round(time.Millisecond))
	default:
		r.say("nothing to do: %s already fills %s", r.opts.Mountpoint, r.res.Disk)
	}
}

// verifyBlocks checks that the file system on partPath has want blocks.
func verifyBlocks(opts Options, partPath string, want uint64) error {
	sb, err := readPartitionSuper(opts, partPath)
	if err != nil {
		return fmt.Errorf("resize: after growing: %w", err)
	}
	if sb.BlocksCount != want {
		return fmt.Errorf("resize: after EXT4_IOC_RESIZE_FS, %s has %d blocks, want %d", partPath, sb.BlocksCount, want)
	}
	return nil
}

// human formats a size in bytes for the log.
func human(n uint64) string { return units.Bytes(int64(n)) }
