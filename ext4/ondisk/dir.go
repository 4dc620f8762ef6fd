package ondisk

import (
	"encoding/binary"
	"fmt"
)

// Directory blocks (directory.rst).
const (
	// DirTailSize is the size of the checksum tail at the end of a linear
	// directory block: a fake entry of inode 0, rec_len 12, file type 0xDE,
	// then the checksum.
	DirTailSize = 12
	dirTailType = 0xDE
	// DxRootInfo is the offset of struct dx_root_info in an htree root
	// block, after the "." and ".." entries.
	DxRootInfo = 0x18
)

// PutDirTail writes the checksum tail of directory leaf block b: the fake
// entry and crc32c from the directory's InodeSeed over the entries before.
func PutDirTail(b []byte, inodeSeed uint32) {
	le := binary.LittleEndian
	t := b[len(b)-DirTailSize:]
	le.PutUint32(t[0:], 0)
	le.PutUint16(t[4:], DirTailSize)
	t[6], t[7] = 0, dirTailType
	le.PutUint32(t[8:], CRC32C(inodeSeed, b[:len(b)-DirTailSize]))
}

// HasDirTail reports whether directory block b ends in a checksum tail.
func HasDirTail(b []byte) bool {
	if len(b) < DirTailSize {
		return false
	}
	t := b[len(b)-DirTailSize:]
	le := binary.LittleEndian
	return le.Uint32(t) == 0 && le.Uint16(t[4:]) == DirTailSize && t[6] == 0 && t[7] == dirTailType
}

// DxRootCountOffset is where the limit/count header of an htree root block
// starts: after dx_root_info, whose info_length says how long it is.
func DxRootCountOffset(b []byte) int { return DxRootInfo + int(b[DxRootInfo+5]) }

// SetDxChecksum stores the checksum of an htree node (root or interior)
// whose limit/count header is at countOffset: the dx_tail after limit
// entries holds crc32c from the directory's InodeSeed over the block up to
// the last used entry, then dt_reserved, then a zero checksum.
func SetDxChecksum(b []byte, countOffset int, inodeSeed uint32) error {
	le := binary.LittleEndian
	if countOffset+4 > len(b) {
		return fmt.Errorf("%w: htree header at %d beyond the block", ErrCorrupt, countOffset)
	}
	limit := int(le.Uint16(b[countOffset:]))
	count := int(le.Uint16(b[countOffset+2:]))
	tail := countOffset + limit*8
	if count > limit || tail+8 > len(b) {
		return fmt.Errorf("%w: htree node count %d, limit %d do not fit the block", ErrCorrupt, count, limit)
	}
	c := CRC32C(inodeSeed, b[:countOffset+count*8])
	c = CRC32C(c, b[tail:tail+4])
	c = CRC32C(c, zero4[:])
	le.PutUint32(b[tail+4:], c)
	return nil
}
