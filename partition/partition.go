// Package partition lays out and writes the partition tables of an image:
// the seed's MBR layout and the GPT layouts that nixpkgs' make-disk-image
// knows (legacy+gpt, efi, hybrid), plus an empty FAT32 EFI system partition.
//
// Tables and the FAT32 file system are written with go-diskfs; this package
// adds the layout arithmetic (1 MiB alignment, room for the backup GPT),
// deterministic identifiers (the MBR disk signature, GPT disk and partition
// GUIDs and the FAT volume serial all come from a caller-given seed), and an
// io.WriterAt interface in place of go-diskfs' file-shaped one.
//
// Limits: 512-byte logical sectors; MBR disks up to 2 TiB; the ESP is at
// least 512 MiB because go-diskfs v1.9.4 writes a corrupt FAT32 at 64 MiB.
package partition

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
	"github.com/diskfs/go-diskfs/partition/gpt"
	"github.com/diskfs/go-diskfs/partition/mbr"
)

// Sizes in bytes.
const (
	SectorSize = 512
	MiB        = 1 << 20
	// Align is the alignment of every partition start and of the disk size.
	Align = MiB
	// BIOSBootSize is the size of the bios_grub partition (GRUB's core.img).
	BIOSBootSize = MiB
	// MinESPSize is the smallest ESP we write.
	MinESPSize = 512 * MiB
	// DefaultESPSize is the ESP size when none is given.
	DefaultESPSize = 512 * MiB
	// gptTail is what the backup GPT takes at the end of the disk: 32
	// sectors of entries and the header.
	gptTail = 33 * SectorSize
	// mbrLimit is the largest disk an MBR table can address.
	mbrLimit = (1 << 32) * SectorSize
)

// Layout names a partition layout, as the --layout flag takes it.
type Layout string

// The layouts.
const (
	Legacy    Layout = "legacy"     // MBR, one Linux partition from 1 MiB to the end (the seed's)
	LegacyGPT Layout = "legacy+gpt" // GPT with a bios_grub partition, then root
	EFI       Layout = "efi"        // GPT with an ESP, then root
	Hybrid    Layout = "hybrid"     // GPT with bios_grub and an ESP, then root
)

// Layouts lists every layout, the default first.
var Layouts = []Layout{Legacy, LegacyGPT, EFI, Hybrid}

var (
	// ErrLayout reports an unknown layout name.
	ErrLayout = errors.New("partition: unknown layout")
	// ErrTooLarge reports a disk that the layout cannot address.
	ErrTooLarge = errors.New("partition: disk too large for layout")
	// ErrESPSize reports an EFI system partition below MinESPSize.
	ErrESPSize = errors.New("partition: ESP too small")
)

// ParseLayout checks a layout name.
func ParseLayout(s string) (Layout, error) {
	for _, l := range Layouts {
		if string(l) == s {
			return l, nil
		}
	}
	names := make([]string, len(Layouts))
	for i, l := range Layouts {
		names[i] = string(l)
	}
	return "", fmt.Errorf("%w %q: want one of %s", ErrLayout, s, strings.Join(names, ", "))
}

// GPT reports whether the layout uses a GUID partition table.
func (l Layout) GPT() bool { return l != Legacy }

// HasESP reports whether the layout has an EFI system partition.
func (l Layout) HasESP() bool { return l == EFI || l == Hybrid }

// HasBIOSBoot reports whether the layout has a bios_grub partition.
func (l Layout) HasBIOSBoot() bool { return l == LegacyGPT || l == Hybrid }

// Extent is a byte range of the disk.
type Extent struct {
	Start, Size int64
}

// End is the first byte after the extent.
func (e Extent) End() int64 { return e.Start + e.Size }

// Plan is a disk layout: where each partition lives.
type Plan struct {
	Layout   Layout
	DiskSize int64
	BIOSBoot Extent // zero when absent
	ESP      Extent // zero when absent
	Root     Extent
}

// NewPlan lays out a disk whose root partition holds at least rootSize bytes.
// espSize 0 means DefaultESPSize. The root partition ends at the last 1 MiB
// boundary before the disk's end (GPT: before the backup table).
func NewPlan(layout Layout, rootSize, espSize int64) (*Plan, error) {
	if _, err := ParseLayout(string(layout)); err != nil {
		return nil, err
	}
	if espSize == 0 {
		espSize = DefaultESPSize
	}
	if layout.HasESP() && espSize < MinESPSize {
		return nil, fmt.Errorf("%w: got %d MiB, want at least %d MiB", ErrESPSize, espSize/MiB, MinESPSize/MiB)
	}
	p := &Plan{Layout: layout}
	off := int64(Align)
	if layout.HasBIOSBoot() {
		p.BIOSBoot = Extent{off, BIOSBootSize}
		off += BIOSBootSize
	}
	if layout.HasESP() {
		p.ESP = Extent{off, alignUp(espSize)}
		off += p.ESP.Size
	}
	p.Root = Extent{off, alignUp(rootSize)}
	p.DiskSize = p.Root.End()
	if layout.GPT() {
		// The backup GPT needs 33 sectors; keep the disk a whole number
		// of MiB, as qemu-img and LVM like it.
		p.DiskSize = alignUp(p.DiskSize + gptTail)
	} else if p.DiskSize > mbrLimit {
		return nil, fmt.Errorf("%w: %s (MBR) addresses at most 2 TiB, want %d bytes; a GPT layout has no such limit", ErrTooLarge, layout, p.DiskSize)
	}
	return p, nil
}

func alignUp(n int64) int64 { return (n + Align - 1) / Align * Align }

// IDs are the identifiers of a disk, all derived from one seed.
type IDs struct {
	MBRSignature uint32
	DiskGUID     string
	PartGUIDs    [4]string // by partition index - 1
	FATSerial    uint32
}

// DeriveIDs derives every identifier of the partition tables from seed, so
// that the same seed gives the same disk.
func DeriveIDs(seed []byte) IDs {
	h := func(what string) []byte {
		s := sha256.New()
		s.Write([]byte("nixvm-image partition " + what + "\x00"))
		s.Write(seed)
		return s.Sum(nil)
	}
	var ids IDs
	ids.MBRSignature = binary.LittleEndian.Uint32(h("mbr"))
	ids.DiskGUID = guidString(h("disk"))
	for i := range ids.PartGUIDs {
		ids.PartGUIDs[i] = guidString(h(fmt.Sprintf("part%d", i+1)))
	}
	ids.FATSerial = binary.LittleEndian.Uint32(h("fat"))
	return ids
}

// guidString formats 16 bytes as an RFC 4122 version 4 GUID string.
func guidString(b []byte) string {
	var u [16]byte
	copy(u[:], b)
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%X-%X-%X-%X-%X", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// Partitions returns the partitions in table order with their 1-based index.
func (p *Plan) Partitions() []Named {
	var out []Named
	if p.BIOSBoot.Size > 0 {
		out = append(out, Named{Name: "bios", Extent: p.BIOSBoot})
	}
	if p.ESP.Size > 0 {
		out = append(out, Named{Name: "ESP", Extent: p.ESP})
	}
	out = append(out, Named{Name: "nixos", Extent: p.Root})
	for i := range out {
		out[i].Index = i + 1
	}
	return out
}

// Named is one partition of a plan.
type Named struct {
	Index int
	Name  string
	Extent
}

// RootIndex is the 1-based index of the root partition.
func (p *Plan) RootIndex() int { return len(p.Partitions()) }

// WriteTable writes the partition table of p to dst, a zero-filled disk of
// p.DiskSize bytes.
func (p *Plan) WriteTable(dst io.WriterAt, ids IDs) error {
	f := &writerFile{w: dst}
	parts := p.Partitions()
	if !p.Layout.GPT() {
		t := &mbr.Table{LogicalSectorSize: SectorSize, PhysicalSectorSize: SectorSize}
		for _, pt := range parts {
			t.Partitions = append(t.Partitions, &mbr.Partition{
				Bootable: true,
				Type:     mbr.Linux,
				Start:    uint32(pt.Start / SectorSize),
				Size:     uint32(pt.Size / SectorSize),
			})
		}
		if err := t.Write(f, p.DiskSize); err != nil {
			return fmt.Errorf("partition: write MBR: %w", err)
		}
		// go-diskfs leaves the disk signature alone; it names the
		// partitions (PARTUUID=xxxxxxxx-01), so make it ours.
		var sig [4]byte
		binary.LittleEndian.PutUint32(sig[:], ids.MBRSignature)
		if _, err := dst.WriteAt(sig[:], 440); err != nil {
			return fmt.Errorf("partition: write MBR signature: %w", err)
		}
		return nil
	}
	t := &gpt.Table{
		LogicalSectorSize:  SectorSize,
		PhysicalSectorSize: SectorSize,
		ProtectiveMBR:      true,
		GUID:               ids.DiskGUID,
	}
	for i, pt := range parts {
		typ := gpt.LinuxFilesystem
		switch pt.Name {
		case "bios":
			typ = gpt.BIOSBoot
		case "ESP":
			typ = gpt.EFISystemPartition
		}
		t.Partitions = append(t.Partitions, &gpt.Partition{
			Index: i + 1,
			Start: uint64(pt.Start / SectorSize),
			End:   uint64(pt.End()/SectorSize - 1),
			Size:  uint64(pt.Size),
			Type:  typ,
			Name:  pt.Name,
			GUID:  ids.PartGUIDs[i],
		})
	}
	if err := t.Write(f, p.DiskSize); err != nil {
		return fmt.Errorf("partition: write GPT: %w", err)
	}
	return nil
}

// ReadWriterAt is a disk: the ESP writer reads back what go-diskfs wrote.
type ReadWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// WriteESP formats the ESP of p as an empty FAT32 file system labelled
// "ESP", the label NixOS' make-disk-image uses.
func (p *Plan) WriteESP(dst ReadWriterAt, ids IDs) error {
	if p.ESP.Size == 0 {
		return nil
	}
	st := &writerStorage{writerFile{w: dst}}
	if _, err := fat32.Create(st, p.ESP.Size, p.ESP.Start, SectorSize, "ESP", true); err != nil {
		return fmt.Errorf("partition: format ESP: %w", err)
	}
	// The reproducible mode leaves the volume serial 0; give it ours, in
	// the boot sector and its backup (sector 6).
	var serial [4]byte
	binary.LittleEndian.PutUint32(serial[:], ids.FATSerial)
	for _, sector := range []int64{0, 6} {
		if _, err := dst.WriteAt(serial[:], p.ESP.Start+sector*SectorSize+0x43); err != nil {
			return fmt.Errorf("partition: write ESP serial: %w", err)
		}
	}
	return fixLabelTime(dst, p.ESP.Start)
}

// fixLabelTime gives the volume label's directory entry, which go-diskfs
// stamps with the current time, a fixed one: 1980-01-01 00:00, FAT's epoch.
func fixLabelTime(d ReadWriterAt, start int64) error {
	var bs [SectorSize]byte
	if _, err := d.ReadAt(bs[:], start); err != nil {
		return fmt.Errorf("partition: read ESP boot sector: %w", err)
	}
	bps := int64(binary.LittleEndian.Uint16(bs[11:]))
	spc := int64(bs[13])
	reserved := int64(binary.LittleEndian.Uint16(bs[14:]))
	fats := int64(bs[16])
	spf := int64(binary.LittleEndian.Uint32(bs[36:]))
	rootCluster := int64(binary.LittleEndian.Uint32(bs[44:]))
	if bps != SectorSize || spc == 0 || rootCluster < 2 {
		return fmt.Errorf("partition: BUG: unexpected FAT32 boot sector (bytes/sector %d, sectors/cluster %d)", bps, spc)
	}
	rootOff := start + (reserved+fats*spf+(rootCluster-2)*spc)*bps
	dir := make([]byte, spc*bps)
	if _, err := d.ReadAt(dir, rootOff); err != nil {
		return fmt.Errorf("partition: read ESP root directory: %w", err)
	}
	for off := 0; off+32 <= len(dir) && dir[off] != 0; off += 32 {
		e := dir[off : off+32]
		if e[11]&0x08 == 0 || e[11] == 0x0f { // not a volume label (or an LFN entry)
			continue
		}
		const fatEpochDate = 1<<5 | 1 // 1980-01-01
		e[13] = 0
		binary.LittleEndian.PutUint16(e[14:], 0)
		binary.LittleEndian.PutUint16(e[16:], fatEpochDate)
		binary.LittleEndian.PutUint16(e[18:], fatEpochDate)
		binary.LittleEndian.PutUint16(e[22:], 0)
		binary.LittleEndian.PutUint16(e[24:], fatEpochDate)
	}
	if _, err := d.WriteAt(dir, rootOff); err != nil {
		return fmt.Errorf("partition: write ESP root directory: %w", err)
	}
	return nil
}

// writerFile adapts an io.WriterAt to go-diskfs' file interface. go-diskfs
// only writes when it creates tables; reads see zeros, which is what a fresh
// sparse disk holds.
type writerFile struct{ w io.WriterAt }

func (f *writerFile) WriteAt(p []byte, off int64) (int, error) { return f.w.WriteAt(p, off) }
func (f *writerFile) ReadAt(p []byte, off int64) (int, error) {
	if r, ok := f.w.(io.ReaderAt); ok {
		return r.ReadAt(p, off)
	}
	clear(p)
	return len(p), nil
}
func (f *writerFile) Read(p []byte) (int, error)                 { return 0, io.EOF }
func (f *writerFile) Seek(int64, int) (int64, error)             { return 0, nil }
func (f *writerFile) Close() error                               { return nil }
func (f *writerFile) Stat() (fs.FileInfo, error)                 { return fileInfo{}, nil }
func (s *writerStorage) Sys() (*osFile, error)                   { return nil, backend.ErrNotSuitable }
func (s *writerStorage) Writable() (backend.WritableFile, error) { return &s.writerFile, nil }
func (s *writerStorage) Path() string                            { return "" }

type writerStorage struct{ writerFile }

type fileInfo struct{}

func (fileInfo) Name() string       { return "disk" }
func (fileInfo) Size() int64        { return 0 }
func (fileInfo) Mode() fs.FileMode  { return 0o600 }
func (fileInfo) ModTime() time.Time { return time.Time{} }
func (fileInfo) IsDir() bool        { return false }
func (fileInfo) Sys() any           { return nil }

type osFile = os.File
