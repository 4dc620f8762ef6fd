package resize

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// Device is an open disk or partition: a block device in the guest, an image
// file in tests.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Close() error
}

// mbrLimit is the number of sectors a 32-bit LBA can address: partitions in
// an MBR table must end within it (2 TiB with 512-byte sectors).
const mbrLimit = 1 << 32

// alignBytes is the alignment of a grown GPT partition's end, sfdisk's
// default grain.
const alignBytes = 1 << 20

// plan says how one partition table would grow one partition.
type plan struct {
	table      string // "gpt" or "mbr"
	pno        int    // 1-based partition number
	start      uint64 // first sector (logical sectors)
	oldEnd     uint64 // last sector now (inclusive)
	newEnd     uint64 // last sector after growing (inclusive)
	note       string // how newEnd was chosen
	tableFixes []string

	ss          int
	diskSectors uint64

	// GPT state: header fields and the entry array to write.
	gptHdr     []byte // primary header sector contents (as read, or rebuilt from the backup)
	gptEntries []byte
	entrySize  int
	entryLBA   uint64 // primary entry array LBA
	// MBR sector 0 as read.
	mbr []byte
}

// upToDate reports whether the table needs no write.
func (p *plan) upToDate() bool { return p.newEnd == p.oldEnd && len(p.tableFixes) == 0 }

func readSector(d io.ReaderAt, ss int, lba uint64) ([]byte, error) {
	b := make([]byte, ss)
	if _, err := d.ReadAt(b, int64(lba)*int64(ss)); err != nil {
		return nil, fmt.Errorf("resize: read sector %d: %w", lba, err)
	}
	return b, nil
}

// planTable reads the partition table of a disk of diskSectors sectors of ss
// bytes and plans growing partition pno to the end of the disk.
func planTable(d io.ReaderAt, ss int, diskSectors uint64, pno int) (*plan, error) {
	if diskSectors < 64 {
		return nil, fmt.Errorf("%w: disk of %d sectors is too small for a partition table", ErrCorruptTable, diskSectors)
	}
	mbr, err := readSector(d, ss, 0)
	if err != nil {
		return nil, err
	}
	if mbr[510] != 0x55 || mbr[511] != 0xaa {
		return nil, fmt.Errorf("%w: no MBR boot signature in sector 0 (got %#02x%02x, want 0x55aa)", ErrNoTable, mbr[510], mbr[511])
	}
	for i := 0; i < 4; i++ {
		if mbr[446+16*i+4] == 0xee {
			return planGPT(d, ss, diskSectors, pno, mbr)
		}
	}
	return planMBR(ss, diskSectors, pno, mbr)
}

// ---- MBR ----

func planMBR(ss int, diskSectors uint64, pno int, mbr []byte) (*plan, error) {
	if pno < 1 || pno > 4 {
		return nil, fmt.Errorf("%w: partition %d is a logical partition inside an MBR extended partition", ErrUnsupported, pno)
	}
	ent := func(i int) (typ byte, start, size uint64) {
		e := mbr[446+16*i:]
		return e[4], uint64(binary.LittleEndian.Uint32(e[8:])), uint64(binary.LittleEndian.Uint32(e[12:]))
	}
	typ, start, size := ent(pno - 1)
	if typ == 0 || size == 0 || start == 0 {
		return nil, fmt.Errorf("%w: MBR entry %d is empty", ErrCorruptTable, pno)
	}
	if typ == 0x05 || typ == 0x0f || typ == 0x85 {
		return nil, fmt.Errorf("%w: MBR entry %d is an extended partition", ErrUnsupported, pno)
	}
	for i := 0; i < 4; i++ {
		t, s, n := ent(i)
		if i == pno-1 || t == 0 || n == 0 {
			continue
		}
		if s > start {
			return nil, fmt.Errorf("%w: MBR partition %d (sectors %d-%d) follows partition %d", ErrNotLast, i+1, s, s+n-1, pno)
		}
	}
	p := &plan{table: "mbr", pno: pno, start: start, oldEnd: start + size - 1, ss: ss, diskSectors: diskSectors, mbr: mbr}
	limit := diskSectors
	p.note = "to the last sector of the disk (MBR needs no alignment at the end)"
	if limit > mbrLimit {
		limit = mbrLimit
		p.note = fmt.Sprintf("to the MBR limit of %d sectors (%s): the disk has %s; the rest stays unused (convert to GPT to use it)",
			uint64(mbrLimit), human(mbrLimit*uint64(ss)), human(diskSectors*uint64(ss)))
	}
	p.newEnd = limit - 1
	if p.newEnd < p.oldEnd {
		if p.oldEnd >= diskSectors {
			return nil, fmt.Errorf("%w: MBR partition %d ends at sector %d, beyond the disk's last sector %d", ErrCorruptTable, pno, p.oldEnd, diskSectors-1)
		}
		p.newEnd = p.oldEnd // already beyond the limit we would choose: leave it
	}
	return p, nil
}

// chs encodes an LBA as the 3-byte CHS value fdisk writes (255 heads, 63
// sectors per track), saturating at 1023/254/63.
func chs(lba uint64) [3]byte {
	const heads, spt = 255, 63
	c, h, s := lba/(heads*spt), (lba/spt)%heads, lba%spt+1
	if c > 1023 {
		c, h, s = 1023, 254, 63
	}
	return [3]byte{byte(h), byte(s) | byte(c>>8)<<6, byte(c)}
}

func (p *plan) applyMBR(d Device, say func(string, ...any)) error {
	b := bytes.Clone(p.mbr)
	e := b[446+16*(p.pno-1):]
	binary.LittleEndian.PutUint32(e[12:], uint32(p.newEnd-p.start+1))
	c := chs(p.newEnd)
	copy(e[5:8], c[:])
	// One sector, one write: a power cut leaves either the old or the new table.
	if _, err := d.WriteAt(b, 0); err != nil {
		return fmt.Errorf("resize: write MBR: %w", err)
	}
	if err := d.Sync(); err != nil {
		return fmt.Errorf("resize: sync after writing MBR: %w", err)
	}
	say("mbr: wrote sector 0 (partition %d now sectors %d-%d)", p.pno, p.start, p.newEnd)
	return nil
}

// ---- GPT ----

const (
	gptSig        = "EFI PART"
	gptMinHdrSize = 92
)

type gptHeader struct {
	raw                   []byte
	size                  uint32
	my, alt               uint64
	firstUsable, lastUsab uint64
	entryLBA              uint64
	nEntries, entrySize   uint32
	entriesCRC            uint32
}

func parseGPTHeader(b []byte, wantLBA uint64) (*gptHeader, error) {
	if string(b[:8]) != gptSig {
		return nil, fmt.Errorf("signature got %q, want %q", b[:8], gptSig)
	}
	h := &gptHeader{raw: b, size: binary.LittleEndian.Uint32(b[12:])}
	if h.size < gptMinHdrSize || int(h.size) > len(b) {
		return nil, fmt.Errorf("header size got %d, want %d..%d", h.size, gptMinHdrSize, len(b))
	}
	hc := bytes.Clone(b[:h.size])
	binary.LittleEndian.PutUint32(hc[16:], 0)
	if got, want := crc32.ChecksumIEEE(hc), binary.LittleEndian.Uint32(b[16:]); got != want {
		return nil, fmt.Errorf("header CRC got %#08x, want %#08x", got, want)
	}
	h.my = binary.LittleEndian.Uint64(b[24:])
	h.alt = binary.LittleEndian.Uint64(b[32:])
	h.firstUsable = binary.LittleEndian.Uint64(b[40:])
	h.lastUsab = binary.LittleEndian.Uint64(b[48:])
	h.entryLBA = binary.LittleEndian.Uint64(b[72:])
	h.nEntries = binary.LittleEndian.Uint32(b[80:])
	h.entrySize = binary.LittleEndian.Uint32(b[84:])
	h.entriesCRC = binary.LittleEndian.Uint32(b[88:])
	if h.my != wantLBA {
		return nil, fmt.Errorf("header LBA got %d, want %d", h.my, wantLBA)
	}
	if h.entrySize < 128 || h.entrySize%8 != 0 || h.nEntries == 0 || uint64(h.nEntries)*uint64(h.entrySize) > 1<<20 {
		return nil, fmt.Errorf("entry array %d x %d bytes is not supported", h.nEntries, h.entrySize)
	}
	return h, nil
}

func readGPT(d io.ReaderAt, ss int, lba uint64) (*gptHeader, []byte, error) {
	b, err := readSector(d, ss, lba)
	if err != nil {
		return nil, nil, err
	}
	h, err := parseGPTHeader(b, lba)
	if err != nil {
		return nil, nil, err
	}
	ents := make([]byte, int(h.nEntries)*int(h.entrySize))
	if _, err := d.ReadAt(ents, int64(h.entryLBA)*int64(ss)); err != nil {
		return nil, nil, fmt.Errorf("read entries at LBA %d: %w", h.entryLBA, err)
	}
	if got := crc32.ChecksumIEEE(ents); got != h.entriesCRC {
		return nil, nil, fmt.Errorf("entry array CRC got %#08x, want %#08x", got, h.entriesCRC)
	}
	return h, ents, nil
}

func planGPT(d io.ReaderAt, ss int, diskSectors uint64, pno int, pmbr []byte) (*plan, error) {
	last := diskSectors - 1
	h, ents, fixes, primaryOK, err := readGPTOrBackup(d, ss, last)
	if err != nil {
		return nil, err
	}
	start, end, err := gptPartition(h, ents, pno)
	if err != nil {
		return nil, err
	}
	entrySectors := (uint64(h.nEntries)*uint64(h.entrySize) + uint64(ss) - 1) / uint64(ss)
	if last < 2*entrySectors+3 || start < 2+entrySectors || end < start {
		return nil, fmt.Errorf("%w: GPT partition %d at LBA %d-%d does not fit a disk of %d sectors with %d-sector entry arrays",
			ErrCorruptTable, pno, start, end, diskSectors, entrySectors)
	}
	lastUsable := last - entrySectors - 1
	entryLBA := h.entryLBA
	if primaryOK && entryLBA >= h.firstUsable {
		// Left so by a run cut between steps 2 and 4 of applyGPT.
		entryLBA = 2
		fixes = append(fixes, fmt.Sprintf("primary GPT header points at the entry array at LBA %d: moving it back to LBA 2", h.entryLBA))
	}
	if entryLBA+entrySectors > h.firstUsable {
		return nil, fmt.Errorf("%w: primary GPT entries at LBA %d-%d overlap the first usable LBA %d", ErrCorruptTable, entryLBA, entryLBA+entrySectors-1, h.firstUsable)
	}
	if end > lastUsable {
		if end >= diskSectors {
			return nil, fmt.Errorf("%w: GPT partition %d ends at LBA %d, beyond the disk's last LBA %d", ErrCorruptTable, pno, end, last)
		}
		return nil, fmt.Errorf("%w: GPT partition %d ends at LBA %d, inside the backup table area (last usable LBA %d)", ErrCorruptTable, pno, end, lastUsable)
	}
	if primaryOK && (h.alt != last || h.lastUsab != lastUsable) {
		fixes = append(fixes, fmt.Sprintf("backup GPT at LBA %d moves to the disk's last LBA %d", h.alt, last))
	}
	pmbrSize := uint64(binary.LittleEndian.Uint32(pmbr[446+12:]))
	if want := min(diskSectors-1, 0xffffffff); pmbr[446+4] == 0xee && pmbrSize != want {
		fixes = append(fixes, fmt.Sprintf("protective MBR covers %d sectors, want %d", pmbrSize, want))
	}
	return &plan{
		table: "gpt", pno: pno, start: start, oldEnd: end, newEnd: gptEnd(end, lastUsable, ss),
		note: fmt.Sprintf("to the last 1 MiB boundary before the backup GPT (last usable LBA %d)", lastUsable),
		ss:   ss, diskSectors: diskSectors, gptHdr: h.raw, gptEntries: ents, entrySize: int(h.entrySize), entryLBA: entryLBA,
		tableFixes: fixes, mbr: pmbr,
	}, nil
}

// readGPTOrBackup reads the primary GPT. If it is damaged and a run of ours
// was cut between writing the primary entries and the primary header, the
// backup at the (new) end of the disk is complete: the primary is rebuilt
// from it, which fixes says.
func readGPTOrBackup(d io.ReaderAt, ss int, last uint64) (h *gptHeader, ents []byte, fixes []string, primaryOK bool, err error) {
	h, ents, perr := readGPT(d, ss, 1)
	if perr == nil {
		return h, ents, nil, true, nil
	}
	h, ents, berr := readGPT(d, ss, last)
	if berr != nil {
		return nil, nil, nil, false, fmt.Errorf("%w: primary GPT: %v; backup GPT at LBA %d: %v; repair it with sgdisk or gdisk", ErrCorruptTable, perr, last, berr)
	}
	h.entryLBA = 2
	return h, ents, []string{fmt.Sprintf("primary GPT is damaged (%v): rebuilding it from the backup at LBA %d", perr, last)}, false, nil
}

// gptPartition returns the first and last sector of partition pno, which
// must be in use and the last partition on the disk.
func gptPartition(h *gptHeader, ents []byte, pno int) (start, end uint64, err error) {
	if pno < 1 || pno > int(h.nEntries) {
		return 0, 0, fmt.Errorf("%w: partition %d is outside the GPT's %d entries", ErrCorruptTable, pno, h.nEntries)
	}
	es := int(h.entrySize)
	used := func(i int) bool { return !zeros.All(ents[i*es : i*es+16]) } // the type GUID
	rng := func(i int) (uint64, uint64) {
		return binary.LittleEndian.Uint64(ents[i*es+32:]), binary.LittleEndian.Uint64(ents[i*es+40:])
	}
	if !used(pno - 1) {
		return 0, 0, fmt.Errorf("%w: GPT entry %d is empty", ErrCorruptTable, pno)
	}
	start, end = rng(pno - 1)
	for i := 0; i < int(h.nEntries); i++ {
		if i == pno-1 || !used(i) {
			continue
		}
		if s, e := rng(i); s > start || e > end {
			return 0, 0, fmt.Errorf("%w: GPT partition %d (sectors %d-%d) follows partition %d", ErrNotLast, i+1, s, e, pno)
		}
	}
	return start, end, nil
}

// gptEnd is where a GPT partition ending at end grows to. Like sfdisk, it
// ends on a 1 MiB boundary below the last usable LBA (the few sectors in
// between stay free). A partition that already ends past that boundary
// (sgdisk ends at the last usable LBA) is left as it is, so neither tool's
// fresh image is touched.
func gptEnd(end, lastUsable uint64, ss int) uint64 {
	grain := uint64(alignBytes / ss)
	if aligned := (lastUsable + 1) / grain * grain; aligned > 0 && aligned-1 > end {
		return aligned - 1
	}
	return end
}

// gptHeaderFor returns a header sector for LBA my with the given alternate
// and entry array location.
func (p *plan) gptHeaderFor(my, alt, entryLBA, lastUsable uint64, entriesCRC uint32) []byte {
	b := bytes.Clone(p.gptHdr)
	size := binary.LittleEndian.Uint32(b[12:])
	binary.LittleEndian.PutUint64(b[24:], my)
	binary.LittleEndian.PutUint64(b[32:], alt)
	binary.LittleEndian.PutUint64(b[48:], lastUsable)
	binary.LittleEndian.PutUint64(b[72:], entryLBA)
	binary.LittleEndian.PutUint32(b[88:], entriesCRC)
	binary.LittleEndian.PutUint32(b[16:], 0)
	binary.LittleEndian.PutUint32(b[16:], crc32.ChecksumIEEE(b[:size]))
	return b
}

// applyGPT writes the grown table. The order makes a power cut at any point
// harmless: after every single-sector write the primary GPT (the only one the
// Linux kernel reads, unless booted with "gpt": block/partitions/efi.c
// find_valid_gpt) is valid, and the next run finishes the job.
//
//  1. Backup entries, then backup header, at the new end of the disk; sync.
//     The primary is untouched and still names the old backup at the old
//     end, which is intact too.
//  2. Primary header pointing at the entry array written in step 1 (one
//     sector, so it is either the old or the new header, both valid); sync.
//  3. Primary entries at their usual place (LBA 2), which no valid header
//     references during the write; sync.
//  4. Primary header pointing at LBA 2 again; sync. If this is cut, the
//     header of step 2 is still valid; planGPT sees its entry array past
//     the first usable LBA and redoes steps 3 and 4.
//  5. The protective MBR's size; sync. It is only a hint for MBR-only tools;
//     if it is missed, the next run sees a full GPT and fixes just this.
//
// Only then is the kernel told (BLKPG) and the file system grown, so the old
// backup area becomes data only after the new table is durable. A header is
// one sector; disks write a sector atomically.
func (p *plan) applyGPT(d Device, say func(string, ...any)) error {
	ss := uint64(p.ss)
	last := p.diskSectors - 1
	ents := bytes.Clone(p.gptEntries)
	binary.LittleEndian.PutUint64(ents[(p.pno-1)*p.entrySize+40:], p.newEnd)
	crc := crc32.ChecksumIEEE(ents)
	entrySectors := (uint64(len(ents)) + ss - 1) / ss
	backupEntryLBA := last - entrySectors
	lastUsable := backupEntryLBA - 1
	padded := make([]byte, entrySectors*ss)
	copy(padded, ents)
	w := sectorWriter{d, ss}

	// 1.
	if err := w.write("backup GPT entries", padded, backupEntryLBA); err != nil {
		return err
	}
	if err := w.writeSync("backup GPT header", p.gptHeaderFor(last, 1, backupEntryLBA, lastUsable, crc), last); err != nil {
		return err
	}
	say("gpt: wrote backup table at LBA %d-%d", backupEntryLBA, last)
	// 2.
	if err := w.writeSync("interim primary GPT header", p.gptHeaderFor(1, last, backupEntryLBA, lastUsable, crc), 1); err != nil {
		return err
	}
	// 3.
	if err := w.writeSync("primary GPT entries", padded, p.entryLBA); err != nil {
		return err
	}
	// 4.
	if err := w.writeSync("primary GPT header", p.gptHeaderFor(1, last, p.entryLBA, lastUsable, crc), 1); err != nil {
		return err
	}
	say("gpt: wrote primary table (partition %d now LBA %d-%d, last usable LBA %d)", p.pno, p.start, p.newEnd, lastUsable)
	// 5.
	return p.fixProtectiveMBR(w, say)
}

// fixProtectiveMBR makes the protective MBR cover the whole disk (up to
// 2^32-1 sectors).
func (p *plan) fixProtectiveMBR(w sectorWriter, say func(string, ...any)) error {
	if p.mbr[446+4] != 0xee {
		return nil
	}
	want := uint32(min(p.diskSectors-1, 0xffffffff))
	if binary.LittleEndian.Uint32(p.mbr[446+12:]) == want {
		return nil
	}
	b := bytes.Clone(p.mbr)
	binary.LittleEndian.PutUint32(b[446+12:], want)
	c := chs(p.diskSectors - 1)
	copy(b[446+5:446+8], c[:])
	if err := w.writeSync("protective MBR", b, 0); err != nil {
		return err
	}
	say("gpt: protective MBR now covers %d sectors", want)
	return nil
}

// sectorWriter writes sectors of a disk, syncing when asked.
type sectorWriter struct {
	d  Device
	ss uint64
}

func (w sectorWriter) write(what string, b []byte, lba uint64) error {
	if _, err := w.d.WriteAt(b, int64(lba*w.ss)); err != nil {
		return fmt.Errorf("resize: write %s at LBA %d: %w", what, lba, err)
	}
	return nil
}

// writeSync writes, then syncs the disk: the write is durable when it
// returns.
func (w sectorWriter) writeSync(what string, b []byte, lba uint64) error {
	if err := w.write(what, b, lba); err != nil {
		return err
	}
	if err := w.d.Sync(); err != nil {
		return fmt.Errorf("resize: sync after writing %s: %w", what, err)
	}
	return nil
}

func (p *plan) apply(d Device, say func(string, ...any)) error {
	switch p.table {
	case "gpt":
		return p.applyGPT(d, say)
	case "mbr":
		return p.applyMBR(d, say)
	}
	return errors.New("BUG: unknown table " + p.table)
}
