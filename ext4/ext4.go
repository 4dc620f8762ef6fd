// Package ext4 writes ext4 filesystem images from a stream of headers and
// file data, in the manner of archive/tar.
//
// The on-disk format follows the Linux kernel's
// Documentation/filesystems/ext4 (superblock, group descriptors, flex_bg,
// extents, hash-tree directories, metadata_csum with crc32c, the jbd2
// journal superblock). The image has 4 KiB blocks, 256-byte inodes and the
// features of a modern mke2fs ext4 except resize_inode:
//
//	has_journal ext_attr dir_index filetype extent 64bit flex_bg
//	sparse_super large_file huge_file dir_nlink extra_isize metadata_csum
//
// Use: NewWriter, then WriteHeader for each entry (a directory before its
// children; "." sets the root's attributes), Write with exactly Header.Size
// bytes for a regular file, then Close. To size the image first, feed the
// same headers to a Planner and pass its Usage to MinSize.
//
// Scope and limits:
//   - Regular files, directories, symbolic links and hard links only; no
//     extended attributes, ACLs, device nodes, fifos or sockets. A symlink's
//     mode is always 0777.
//   - File data is streamed to blocks allocated contiguously when the header
//     arrives (Header.Size must be exact). Directories, inodes and bitmaps are
//     kept in memory (about 120 bytes per inode plus the names) and written
//     by Close, directory blocks after all file data. Blocks that stay
//     all-zero (unused inode tables, the journal body, zero blocks of files)
//     are never written, so the destination must read as zeros (a fresh,
//     sparse file); inode tables are marked zeroed (INODE_ZEROED).
//   - Directories whose entries fill more than one block are hash-indexed
//     (half_md4 with Options.HashSeed, unsigned; one or two index levels,
//     i.e. up to about 500*510 leaf blocks).
//   - No root-reserved blocks (s_r_blocks_count is 0). The journal (inode 8)
//     has e2fsprogs' default size (ext2fs_default_journal_size); lost+found
//     is 16 KiB like mke2fs's.
//   - There is no resize_inode and s_reserved_gdt_blocks is 0: resize2fs
//     grows the image offline by moving blocks, and the kernel grows it
//     online (EXT4_IOC_RESIZE_FS) by converting it to meta_bg first
//     (fs/ext4/resize.c, ext4_convert_meta_bg). Both are tested to 64x.
//   - The output is a function of the header sequence, the data and the
//     Options only: the same inputs give the same bytes.
//
// Layout-stable rewrites: BeginUnit groups the headers that follow into a
// named placement unit (a Nix store path, say); after Close, Placements
// reports each unit's inodes and blocks. Passed back as Options.Previous to
// the next Writer of the same size, units written again with the same
// headers and data land on the same inodes and blocks, byte for byte, and
// new units fill the free space first where dropped units were (see
// hints.go). ReadPlacements recovers the placements from an image alone.
package ext4

import (
	"errors"
	"fmt"
)

// Sentinel errors. Errors returned by the Writer wrap one of these.
var (
	ErrWriteAfterClose = errors.New("ext4: write after close")
	ErrNoSpace         = errors.New("ext4: no space left")
	ErrWriteTooLong    = errors.New("ext4: write too long")
	ErrMissingData     = errors.New("ext4: file data shorter than header size")
	ErrExist           = errors.New("ext4: file exists")
	ErrNotExist        = errors.New("ext4: no such file or directory")
	ErrNotDir          = errors.New("ext4: not a directory")
	ErrInvalidHeader   = errors.New("ext4: invalid header")
	ErrInvalidOptions  = errors.New("ext4: invalid options")
	ErrTooLarge        = errors.New("ext4: too large")
)

const (
	blockSize    = 4096
	blockShift   = 12
	inodeSize    = 256
	blocksPerGrp = 8 * blockSize
	descSize     = 64
	flexLog      = 4
	flexSize     = 1 << flexLog
	firstIno     = 11
	rootIno      = 2
	journalIno   = 8
	lostFoundIno = 11
	extraIsize   = 32
	// lostFoundBlocks is the size of lost+found in blocks, like mke2fs (16 KiB).
	lostFoundBlocks = 4
)

// Options describe the filesystem to create. The zero value of every field
// but Size is a usable default.
type Options struct {
	Size     int64    // filesystem size in bytes; rounded down to 4096; required
	Label    string   // volume label, at most 16 bytes
	UUID     [16]byte // filesystem UUID
	HashSeed [16]byte // htree hash seed
	Time     int64    // unix seconds for every superblock timestamp
	Inodes   uint32   // 0 = one inode per 16 KiB like mke2fs; rounded up to fill groups

	// Previous keeps units where a previous image of the same Size and
	// Inodes put them: the Placements of its Writer, by unit name (see
	// BeginUnit). nil lays everything out afresh.
	Previous map[string]Placement
}

// Validate checks the options without building anything.
func (o Options) Validate() error {
	g, err := newGeometry(o)
	if err != nil {
		return err
	}
	_, _, err = keptRanges(g, o.Previous)
	return err
}

// Type is the kind of a Header.
type Type uint8

// Header types.
const (
	TypeReg     Type = iota + 1 // regular file
	TypeDir                     // directory
	TypeSymlink                 // symbolic link
	TypeLink                    // hard link to an earlier regular file or symlink
)

func (t Type) String() string {
	switch t {
	case TypeReg:
		return "regular file"
	case TypeDir:
		return "directory"
	case TypeSymlink:
		return "symlink"
	case TypeLink:
		return "hard link"
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Header describes one entry of the tree.
type Header struct {
	Name     string // slash-separated path relative to the root; "." is the root
	Type     Type
	Mode     uint32 // permission bits incl. setuid/setgid/sticky (07777)
	Uid, Gid uint32
	Mtime    int64  // seconds; used for atime, ctime, mtime and crtime
	Size     int64  // regular files: exact number of bytes Write will receive
	Linkname string // symlink target, or for TypeLink the Name of an earlier file
}

// Usage is what a tree needs: inodes (one per header except hard links and
// the root) and 4 KiB blocks for file data, slow symlinks, directories
// (including the root) and extent tree blocks.
type Usage struct {
	Inodes uint64
	Blocks uint64
}
