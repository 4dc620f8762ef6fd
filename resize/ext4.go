package resize

import (
	"encoding/binary"
	"fmt"
	"io"
)

// ext4Super is what growing needs from an ext4 superblock
// (kernel Documentation/filesystems/ext4/super.rst).
type ext4Super struct {
	blocks    uint64
	blockSize uint64
	is64bit   bool
}

const (
	ext4Magic       = 0xef53
	ext4Incompat64  = 0x80
	ext4MaxBlocks32 = 1<<32 - 1
)

func readExt4Super(r io.ReaderAt) (*ext4Super, error) {
	b := make([]byte, 1024)
	if _, err := r.ReadAt(b, 1024); err != nil {
		return nil, fmt.Errorf("resize: read superblock: %w", err)
	}
	if m := binary.LittleEndian.Uint16(b[0x38:]); m != ext4Magic {
		return nil, fmt.Errorf("%w: superblock magic got %#04x, want %#04x (ext2/3/4)", ErrNotExt4, m, ext4Magic)
	}
	logBS := binary.LittleEndian.Uint32(b[0x18:])
	if logBS > 6 {
		return nil, fmt.Errorf("%w: block size 2^(10+%d)", ErrNotExt4, logBS)
	}
	s := &ext4Super{blockSize: 1024 << logBS, blocks: uint64(binary.LittleEndian.Uint32(b[0x4:]))}
	if binary.LittleEndian.Uint32(b[0x60:])&ext4Incompat64 != 0 {
		s.is64bit = true
		s.blocks |= uint64(binary.LittleEndian.Uint32(b[0x150:])) << 32
	}
	return s, nil
}
