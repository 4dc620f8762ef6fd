package ondisk

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Superblock location and size.
const (
	SuperblockOffset = 1024 // from the start of the file system
	SuperblockSize   = 1024
	Magic            = 0xEF53
	maxLogBlockSize  = 6 // 64 KiB, the kernel's EXT4_MAX_BLOCK_LOG_SIZE - 10
	superCsumOffset  = 0x3FC
)

// Superblock holds the fields of an ext4 superblock (struct
// ext4_super_block) that this module reads or writes, named as in the
// kernel. The 64-bit counts join their _lo and _hi halves; the _hi half
// counts only with the 64bit feature, as in the kernel. Time stamps keep
// their 32-bit field and its _hi byte apart, as on disk.
type Superblock struct {
	InodesCount      uint32
	BlocksCount      uint64
	FreeBlocksCount  uint64
	FreeInodesCount  uint32
	FirstDataBlock   uint32
	LogBlockSize     uint32
	LogClusterSize   uint32
	BlocksPerGroup   uint32
	ClustersPerGroup uint32
	InodesPerGroup   uint32
	Mtime, Wtime     uint32
	MtimeHi, WtimeHi uint8
	MntCount         uint16
	MaxMntCount      uint16
	Magic            uint16
	State            uint16
	Errors           uint16
	LastCheck        uint32
	RevLevel         uint32
	FirstIno         uint32
	InodeSize        uint16
	BlockGroupNr     uint16
	FeatureCompat    uint32
	FeatureIncompat  uint32
	FeatureRoCompat  uint32
	UUID             [16]byte
	VolumeName       [16]byte
	JournalInum      uint32
	HashSeed         [16]byte
	DefHashVersion   uint8
	JnlBackupType    uint8
	DescSize         uint16
	DefaultMountOpts uint32
	MkfsTime         uint32
	JnlBlocks        [17]uint32
	MinExtraIsize    uint16
	WantExtraIsize   uint16
	Flags            uint32
	LogGroupsPerFlex uint8
	ChecksumType     uint8
	KbytesWritten    uint64
	ChecksumSeed     uint32
	Checksum         uint32

	raw [SuperblockSize]byte // as parsed; Marshal writes the fields over it
}

// ReadSuperblock reads the primary superblock of the file system that
// starts at byte 0 of r.
func ReadSuperblock(r io.ReaderAt) (*Superblock, error) {
	b := make([]byte, SuperblockSize)
	if _, err := r.ReadAt(b, SuperblockOffset); err != nil {
		return nil, fmt.Errorf("read superblock: %w", err)
	}
	return ParseSuperblock(b)
}

// ParseSuperblock parses the 1024 bytes of a superblock. It checks the
// magic number and the block size only; what else a caller needs (a
// feature, a geometry) is for the caller to check.
func ParseSuperblock(b []byte) (*Superblock, error) {
	if len(b) < SuperblockSize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrNoSuperblock, len(b), SuperblockSize)
	}
	s := &Superblock{}
	copy(s.raw[:], b)
	s.decodeCounts()
	s.decodeFeatures()
	if s.Magic != Magic {
		return nil, fmt.Errorf("%w: magic got %#04x, want %#04x", ErrNoSuperblock, s.Magic, Magic)
	}
	if s.LogBlockSize > maxLogBlockSize {
		return nil, fmt.Errorf("%w: block size 2^(10+%d), want at most 64 KiB", ErrNoSuperblock, s.LogBlockSize)
	}
	return s, nil
}

// decodeCounts reads the fields up to s_feature_compat.
func (s *Superblock) decodeCounts() {
	le, b := binary.LittleEndian, s.raw[:]
	s.InodesCount = le.Uint32(b[0x0:])
	s.FreeInodesCount = le.Uint32(b[0x10:])
	s.FirstDataBlock = le.Uint32(b[0x14:])
	s.LogBlockSize = le.Uint32(b[0x18:])
	s.LogClusterSize = le.Uint32(b[0x1C:])
	s.BlocksPerGroup = le.Uint32(b[0x20:])
	s.ClustersPerGroup = le.Uint32(b[0x24:])
	s.InodesPerGroup = le.Uint32(b[0x28:])
	s.Mtime = le.Uint32(b[0x2C:])
	s.Wtime = le.Uint32(b[0x30:])
	s.MntCount = le.Uint16(b[0x34:])
	s.MaxMntCount = le.Uint16(b[0x36:])
	s.Magic = le.Uint16(b[0x38:])
	s.State = le.Uint16(b[0x3A:])
	s.Errors = le.Uint16(b[0x3C:])
	s.LastCheck = le.Uint32(b[0x40:])
	s.RevLevel = le.Uint32(b[0x4C:])
	s.FirstIno = le.Uint32(b[0x54:])
	s.InodeSize = le.Uint16(b[0x58:])
	s.BlockGroupNr = le.Uint16(b[0x5A:])
}

// decodeFeatures reads the fields from s_feature_compat on; the 64-bit
// counts need the features first.
func (s *Superblock) decodeFeatures() {
	le, b := binary.LittleEndian, s.raw[:]
	s.FeatureCompat = le.Uint32(b[0x5C:])
	s.FeatureIncompat = le.Uint32(b[0x60:])
	s.FeatureRoCompat = le.Uint32(b[0x64:])
	copy(s.UUID[:], b[0x68:])
	copy(s.VolumeName[:], b[0x78:])
	s.JournalInum = le.Uint32(b[0xE0:])
	copy(s.HashSeed[:], b[0xEC:])
	s.DefHashVersion = b[0xFC]
	s.JnlBackupType = b[0xFD]
	s.DescSize = le.Uint16(b[0xFE:])
	s.DefaultMountOpts = le.Uint32(b[0x100:])
	s.MkfsTime = le.Uint32(b[0x108:])
	for i := range s.JnlBlocks {
		s.JnlBlocks[i] = le.Uint32(b[0x10C+4*i:])
	}
	s.BlocksCount = uint64(le.Uint32(b[0x4:]))
	s.FreeBlocksCount = uint64(le.Uint32(b[0xC:]))
	if s.Is64Bit() {
		s.BlocksCount |= uint64(le.Uint32(b[0x150:])) << 32
		s.FreeBlocksCount |= uint64(le.Uint32(b[0x158:])) << 32
	}
	s.MinExtraIsize = le.Uint16(b[0x15C:])
	s.WantExtraIsize = le.Uint16(b[0x15E:])
	s.Flags = le.Uint32(b[0x160:])
	s.LogGroupsPerFlex = b[0x174]
	s.ChecksumType = b[0x175]
	s.KbytesWritten = le.Uint64(b[0x178:])
	s.ChecksumSeed = le.Uint32(b[0x270:])
	s.WtimeHi, s.MtimeHi = b[0x274], b[0x275]
	s.Checksum = le.Uint32(b[superCsumOffset:])
}

// Marshal returns the superblock's 1024 bytes: those it was parsed from
// (zeros for a Superblock built in Go) with its fields written over them,
// and, with metadata_csum, s_checksum computed anew. Without the 64bit
// feature the _hi halves of the counts keep their bytes.
func (s *Superblock) Marshal() []byte {
	b := s.raw
	s.encodeCounts(b[:])
	s.encodeFeatures(b[:])
	if s.MetadataCsum() {
		s.Checksum = CRC32C(^uint32(0), b[:superCsumOffset])
	}
	binary.LittleEndian.PutUint32(b[superCsumOffset:], s.Checksum)
	return b[:]
}

func (s *Superblock) encodeCounts(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0x0:], s.InodesCount)
	le.PutUint32(b[0x4:], uint32(s.BlocksCount))
	le.PutUint32(b[0xC:], uint32(s.FreeBlocksCount))
	le.PutUint32(b[0x10:], s.FreeInodesCount)
	le.PutUint32(b[0x14:], s.FirstDataBlock)
	le.PutUint32(b[0x18:], s.LogBlockSize)
	le.PutUint32(b[0x1C:], s.LogClusterSize)
	le.PutUint32(b[0x20:], s.BlocksPerGroup)
	le.PutUint32(b[0x24:], s.ClustersPerGroup)
	le.PutUint32(b[0x28:], s.InodesPerGroup)
	le.PutUint32(b[0x2C:], s.Mtime)
	le.PutUint32(b[0x30:], s.Wtime)
	le.PutUint16(b[0x34:], s.MntCount)
	le.PutUint16(b[0x36:], s.MaxMntCount)
	le.PutUint16(b[0x38:], s.Magic)
	le.PutUint16(b[0x3A:], s.State)
	le.PutUint16(b[0x3C:], s.Errors)
	le.PutUint32(b[0x40:], s.LastCheck)
	le.PutUint32(b[0x4C:], s.RevLevel)
	le.PutUint32(b[0x54:], s.FirstIno)
	le.PutUint16(b[0x58:], s.InodeSize)
	le.PutUint16(b[0x5A:], s.BlockGroupNr)
}

func (s *Superblock) encodeFeatures(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0x5C:], s.FeatureCompat)
	le.PutUint32(b[0x60:], s.FeatureIncompat)
	le.PutUint32(b[0x64:], s.FeatureRoCompat)
	copy(b[0x68:0x78], s.UUID[:])
	copy(b[0x78:0x88], s.VolumeName[:])
	le.PutUint32(b[0xE0:], s.JournalInum)
	copy(b[0xEC:0xFC], s.HashSeed[:])
	b[0xFC], b[0xFD] = s.DefHashVersion, s.JnlBackupType
	le.PutUint16(b[0xFE:], s.DescSize)
	le.PutUint32(b[0x100:], s.DefaultMountOpts)
	le.PutUint32(b[0x108:], s.MkfsTime)
	for i, v := range s.JnlBlocks {
		le.PutUint32(b[0x10C+4*i:], v)
	}
	if s.Is64Bit() {
		le.PutUint32(b[0x150:], uint32(s.BlocksCount>>32))
		le.PutUint32(b[0x158:], uint32(s.FreeBlocksCount>>32))
	}
	le.PutUint16(b[0x15C:], s.MinExtraIsize)
	le.PutUint16(b[0x15E:], s.WantExtraIsize)
	le.PutUint32(b[0x160:], s.Flags)
	b[0x174], b[0x175] = s.LogGroupsPerFlex, s.ChecksumType
	le.PutUint64(b[0x178:], s.KbytesWritten)
	le.PutUint32(b[0x270:], s.ChecksumSeed)
	b[0x274], b[0x275] = s.WtimeHi, s.MtimeHi
}

// BlockSize is the block size in bytes.
func (s *Superblock) BlockSize() int64 { return 1024 << s.LogBlockSize }

// Is64Bit reports the 64bit feature: 64-bit block numbers and descriptors
// of DescSize bytes.
func (s *Superblock) Is64Bit() bool { return s.FeatureIncompat&Incompat64bit != 0 }

// MetadataCsum reports the metadata_csum feature.
func (s *Superblock) MetadataCsum() bool { return s.FeatureRoCompat&RoCompatMetadataCsum != 0 }

// CsumSeed is the seed of every metadata checksum but the superblock's:
// s_checksum_seed with the csum_seed feature, else crc32c of the UUID.
func (s *Superblock) CsumSeed() uint32 {
	if s.FeatureIncompat&IncompatCsumSeed != 0 {
		return s.ChecksumSeed
	}
	return CRC32C(^uint32(0), s.UUID[:])
}

// GroupDescSize is the size of a group descriptor: DescSize with the 64bit
// feature, else 32.
func (s *Superblock) GroupDescSize() int {
	if s.Is64Bit() {
		return int(s.DescSize)
	}
	return 32
}

// Groups is the number of block groups, 0 when BlocksPerGroup is.
func (s *Superblock) Groups() uint64 {
	if s.BlocksPerGroup == 0 || s.BlocksCount < uint64(s.FirstDataBlock) {
		return 0
	}
	per := uint64(s.BlocksPerGroup)
	return (s.BlocksCount - uint64(s.FirstDataBlock) + per - 1) / per
}
