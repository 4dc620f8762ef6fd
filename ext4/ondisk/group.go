package ondisk

import (
	"encoding/binary"
	"fmt"
	"io"
)

const gdCsumOffset = 0x1E

// GroupDesc is a block group descriptor (struct ext4_group_desc), its
// halves joined. A 32-byte descriptor (without the 64bit feature) has only
// the low halves.
type GroupDesc struct {
	BlockBitmap     uint64
	InodeBitmap     uint64
	InodeTable      uint64
	FreeBlocksCount uint32
	FreeInodesCount uint32
	UsedDirsCount   uint32
	ItableUnused    uint32
	Flags           uint16
	BlockBitmapCsum uint32
	InodeBitmapCsum uint32
	Checksum        uint16
}

// ParseGroupDesc parses a descriptor of len(b) bytes (32, or 64 and more).
func ParseGroupDesc(b []byte) GroupDesc {
	le := binary.LittleEndian
	d := GroupDesc{
		BlockBitmap:     uint64(le.Uint32(b[0x0:])),
		InodeBitmap:     uint64(le.Uint32(b[0x4:])),
		InodeTable:      uint64(le.Uint32(b[0x8:])),
		FreeBlocksCount: uint32(le.Uint16(b[0xC:])),
		FreeInodesCount: uint32(le.Uint16(b[0xE:])),
		UsedDirsCount:   uint32(le.Uint16(b[0x10:])),
		Flags:           le.Uint16(b[0x12:]),
		BlockBitmapCsum: uint32(le.Uint16(b[0x18:])),
		InodeBitmapCsum: uint32(le.Uint16(b[0x1A:])),
		ItableUnused:    uint32(le.Uint16(b[0x1C:])),
		Checksum:        le.Uint16(b[gdCsumOffset:]),
	}
	if len(b) >= 64 {
		d.BlockBitmap |= uint64(le.Uint32(b[0x20:])) << 32
		d.InodeBitmap |= uint64(le.Uint32(b[0x24:])) << 32
		d.InodeTable |= uint64(le.Uint32(b[0x28:])) << 32
		d.FreeBlocksCount |= uint32(le.Uint16(b[0x2C:])) << 16
		d.FreeInodesCount |= uint32(le.Uint16(b[0x2E:])) << 16
		d.UsedDirsCount |= uint32(le.Uint16(b[0x30:])) << 16
		d.ItableUnused |= uint32(le.Uint16(b[0x32:])) << 16
		d.BlockBitmapCsum |= uint32(le.Uint16(b[0x38:])) << 16
		d.InodeBitmapCsum |= uint32(le.Uint16(b[0x3A:])) << 16
	}
	return d
}

// Put writes the descriptor into b (32 bytes, or 64 and more for the high
// halves), leaving the fields it does not name as they are. Set Checksum
// first (see GroupDescChecksum) or call SetGroupDescChecksum after.
func (d *GroupDesc) Put(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0x0:], uint32(d.BlockBitmap))
	le.PutUint32(b[0x4:], uint32(d.InodeBitmap))
	le.PutUint32(b[0x8:], uint32(d.InodeTable))
	le.PutUint16(b[0xC:], uint16(d.FreeBlocksCount))
	le.PutUint16(b[0xE:], uint16(d.FreeInodesCount))
	le.PutUint16(b[0x10:], uint16(d.UsedDirsCount))
	le.PutUint16(b[0x12:], d.Flags)
	le.PutUint16(b[0x18:], uint16(d.BlockBitmapCsum))
	le.PutUint16(b[0x1A:], uint16(d.InodeBitmapCsum))
	le.PutUint16(b[0x1C:], uint16(d.ItableUnused))
	le.PutUint16(b[gdCsumOffset:], d.Checksum)
	if len(b) < 64 {
		return
	}
	le.PutUint32(b[0x20:], uint32(d.BlockBitmap>>32))
	le.PutUint32(b[0x24:], uint32(d.InodeBitmap>>32))
	le.PutUint32(b[0x28:], uint32(d.InodeTable>>32))
	le.PutUint16(b[0x2C:], uint16(d.FreeBlocksCount>>16))
	le.PutUint16(b[0x2E:], uint16(d.FreeInodesCount>>16))
	le.PutUint16(b[0x30:], uint16(d.UsedDirsCount>>16))
	le.PutUint16(b[0x32:], uint16(d.ItableUnused>>16))
	le.PutUint16(b[0x38:], uint16(d.BlockBitmapCsum>>16))
	le.PutUint16(b[0x3A:], uint16(d.InodeBitmapCsum>>16))
}

// GroupDescChecksum is the metadata_csum checksum of descriptor b of group
// g: crc32c of the group number and the descriptor with bg_checksum taken
// as zero, its low 16 bits.
func GroupDescChecksum(seed, g uint32, b []byte) uint16 {
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], g)
	c := CRC32C(seed, n[:])
	c = CRC32C(c, b[:gdCsumOffset])
	c = CRC32C(c, zero4[:2])
	c = CRC32C(c, b[gdCsumOffset+2:])
	return uint16(c)
}

// SetGroupDescChecksum computes and stores the checksum of descriptor b of
// group g.
func SetGroupDescChecksum(seed, g uint32, b []byte) {
	binary.LittleEndian.PutUint16(b[gdCsumOffset:], GroupDescChecksum(seed, g, b))
}

// GroupDescOffset is the byte offset of group g's descriptor from the start
// of the file system: the table starts in the block after the superblock's
// (without meta_bg).
func (s *Superblock) GroupDescOffset(g uint32) int64 {
	return (int64(s.FirstDataBlock)+1)*s.BlockSize() + int64(g)*int64(s.GroupDescSize())
}

// ReadGroupDesc reads the descriptor of group g of the file system that
// starts at byte 0 of r.
func ReadGroupDesc(r io.ReaderAt, s *Superblock, g uint32) (GroupDesc, error) {
	if uint64(g) >= s.Groups() {
		return GroupDesc{}, fmt.Errorf("%w: group %d of %d", ErrCorrupt, g, s.Groups())
	}
	b := make([]byte, s.GroupDescSize())
	if len(b) < 32 {
		return GroupDesc{}, fmt.Errorf("%w: group descriptors of %d bytes, want at least 32", ErrCorrupt, len(b))
	}
	if _, err := r.ReadAt(b, s.GroupDescOffset(g)); err != nil {
		return GroupDesc{}, fmt.Errorf("read group descriptor %d: %w", g, err)
	}
	return ParseGroupDesc(b), nil
}

var zero4 [4]byte
