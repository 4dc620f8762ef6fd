package ondisk

import "encoding/binary"

// Inode fields (struct ext4_inode) that more than one caller touches.
const (
	InodeMode       = 0x0
	InodeFlags      = 0x20
	InodeBlock      = 0x28 // i_block: 60 bytes, the extent tree's root
	InodeBlockSize  = 60
	InodeGeneration = 0x64
	InodeExtraIsize = 0x80
	// GoodOldInodeSize is the size of the inode without its extra space.
	GoodOldInodeSize = 128

	inodeCsumLo = 0x7C
	inodeCsumHi = 0x82
)

// Inode flags (i_flags).
const (
	InodeFlagIndex      = 0x1000     // hash-indexed directory
	InodeFlagExtents    = 0x80000    // i_block holds an extent tree
	InodeFlagInlineData = 0x10000000 // data in the inode
)

// File types in i_mode.
const (
	ModeTypeMask = 0xF000
	ModeDir      = 0x4000
	ModeReg      = 0x8000
	ModeSymlink  = 0xA000
)

// InodeSeed is the checksum seed of an inode and of its metadata blocks
// (extent tree blocks, directory blocks): crc32c of its number and
// generation, from the file system's seed (Superblock.CsumSeed).
func InodeSeed(fsSeed, ino, generation uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], ino)
	c := CRC32C(fsSeed, b[:])
	binary.LittleEndian.PutUint32(b[:], generation)
	return CRC32C(c, b[:])
}

// hasCsumHi reports whether the inode's extra space holds i_checksum_hi.
func hasCsumHi(in []byte) bool {
	return len(in) > GoodOldInodeSize &&
		GoodOldInodeSize+int(binary.LittleEndian.Uint16(in[InodeExtraIsize:])) >= inodeCsumHi+2
}

// InodeChecksum is the metadata_csum checksum of inode number ino, whose
// on-disk bytes (the file system's inode size) are in: crc32c from its
// InodeSeed over the inode with its checksum fields taken as zero.
func InodeChecksum(in []byte, fsSeed, ino uint32) uint32 {
	c := InodeSeed(fsSeed, ino, binary.LittleEndian.Uint32(in[InodeGeneration:]))
	c = CRC32C(c, in[:inodeCsumLo])
	c = CRC32C(c, zero4[:2])
	if len(in) <= GoodOldInodeSize {
		return CRC32C(c, in[inodeCsumLo+2:])
	}
	c = CRC32C(c, in[inodeCsumLo+2:inodeCsumHi])
	rest := inodeCsumHi
	if hasCsumHi(in) {
		c = CRC32C(c, zero4[:2])
		rest += 2
	}
	return CRC32C(c, in[rest:])
}

// SetInodeChecksum computes and stores the checksum of inode ino: its low
// 16 bits in i_checksum_lo, the high ones in i_checksum_hi when the extra
// space holds it.
func SetInodeChecksum(in []byte, fsSeed, ino uint32) {
	c := InodeChecksum(in, fsSeed, ino)
	binary.LittleEndian.PutUint16(in[inodeCsumLo:], uint16(c))
	if hasCsumHi(in) {
		binary.LittleEndian.PutUint16(in[inodeCsumHi:], uint16(c>>16))
	}
}
