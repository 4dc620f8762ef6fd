// Package ondisk reads and writes the ext4 on-disk structures that more
// than one part of nixvm-image needs: the superblock, group descriptors,
// extent tree nodes, directory block tails and hash-tree (htree) nodes, and
// the crc32c checksums that metadata_csum puts on each of them and on
// inodes. The ext4 Writer and reader, the VM stage's normalisation
// (imagebuild/vm) and nixvm-resize (package resize) all go through it, so a
// fix to the format lands in every one of them.
//
// It follows the Linux kernel's Documentation/filesystems/ext4 (super.rst,
// group_descr.rst, inodes.rst, ifork.rst, directory.rst, checksums.rst) and
// fs/ext4/ext4.h. It is a leaf that imports only the standard library:
// nixvm-resize, which reads a superblock and nothing else, stays small.
//
// Scope and limits: only the fields that its callers use are named; a
// Superblock keeps the bytes it was parsed from, so Marshal changes nothing
// else. Group descriptors are located as without meta_bg (right after the
// superblock's block), which is where every file system this module makes
// or normalises has them. Nothing here allocates beyond one block.
package ondisk

import (
	"errors"
	"hash/crc32"
)

// Errors. Parsers wrap one of these with what they found.
var (
	// ErrNoSuperblock reports bytes that hold no ext2/3/4 superblock (bad
	// magic, or a block size the kernel does not support).
	ErrNoSuperblock = errors.New("no ext2/3/4 superblock")
	// ErrCorrupt reports metadata that contradicts itself: an extent node
	// without its magic or overflowing its block, an htree node whose
	// count does not fit, a directory block without its checksum tail.
	ErrCorrupt = errors.New("corrupt ext4 metadata")
)

// CRC32C is the kernel's ext4_chksum: crc32c (Castagnoli) continuing from
// seed, without the final inversion. Checksums chain: CRC32C(CRC32C(s, a), b)
// is the checksum of a followed by b.
//
// The table is made on first use (hash/crc32 makes it once), not at init:
// a program that never computes a checksum, like nixvm-resize, neither
// builds nor links it.
func CRC32C(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, crc32.MakeTable(crc32.Castagnoli), p)
}

// Feature flags (super.rst, "Compatible/Incompatible/Readonly-compatible
// feature set").
const (
	CompatHasJournal = 0x4
	CompatExtAttr    = 0x8
	CompatDirIndex   = 0x20

	IncompatFiletype = 0x2
	IncompatExtents  = 0x40
	Incompat64bit    = 0x80
	IncompatFlexBG   = 0x200
	IncompatCsumSeed = 0x2000

	RoCompatSparseSuper  = 0x1
	RoCompatLargeFile    = 0x2
	RoCompatHugeFile     = 0x8
	RoCompatDirNlink     = 0x20
	RoCompatExtraIsize   = 0x40
	RoCompatMetadataCsum = 0x400
)

// Block group flags (bg_flags).
const (
	BGInodeUninit = 0x1
	BGInodeZeroed = 0x4
)

// JournalMagic is the jbd2 superblock's h_magic (big-endian on disk).
const JournalMagic = 0xC03B3998
