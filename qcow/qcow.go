// Package qcow writes qcow2 images (version 3) from a stream of virtual-disk
// data, in the io-shaped style of archive/tar: NewWriter, WriteAt at
// ascending offsets, Close.
//
// The format follows QEMU's docs/interop/qcow2.txt. What this package writes:
//
//   - version 3 header with header_length 112 and the compression_type field;
//     zstd sets incompatible feature bit 3 ("compression type") as QEMU does,
//     zlib (raw deflate, QEMU's 4 KiB window) leaves it clear; no header
//     extensions besides the end marker, no backing file, no snapshots,
//     no encryption, no extended L2 entries;
//   - cluster size 1<<ClusterBits (default 64 KiB), refcount_order 4
//     (16-bit refcounts, QEMU's default);
//   - layout: header in cluster 0, then data clusters in ascending guest
//     order, then the L2 tables, the L1 table, the refcount blocks and the
//     refcount table. The header is written last, by Close;
//   - all-zero guest clusters stay unallocated (they read as zeros);
//   - compressed clusters are packed sector-granular (each starts on a
//     512-byte boundary) and may span into the next host cluster when it is
//     contiguous, like QEMU's own allocator; a host cluster's refcount counts
//     every compressed cluster touching it, so `qemu-img check` reports no
//     leaks and no corruptions;
//   - a cluster whose compressed form is not smaller than the cluster is
//     stored uncompressed (QEMU does the same).
//
// Compression runs on Options.Workers goroutines, but results are placed in
// guest order, so the output bytes do not depend on the worker count, the
// machine or the time: the same input gives the same image.
//
// Limits: guest data must arrive at ascending offsets (gaps are zeros); the
// writer keeps all L2 tables (8 bytes per guest cluster: 32 MiB for a 2 TiB
// disk at 64 KiB clusters) and one 16-bit refcount per host cluster in
// memory, plus at most a few clusters per worker in flight.
package qcow

import (
	"errors"
	"fmt"
	"runtime"
)

// Errors returned by the writer. They are wrapped with details; test with
// errors.Is.
var (
	ErrWriteAfterClose = errors.New("qcow: write after close")
	ErrNotAscending    = errors.New("qcow: write offset not ascending")
	ErrBeyondEnd       = errors.New("qcow: write beyond the virtual disk size")
	ErrInvalidOptions  = errors.New("qcow: invalid options")
	ErrInvalidSize     = errors.New("qcow: invalid virtual size")
)

// Compression selects how guest clusters are compressed. The zero value is
// Zstd.
type Compression int

const (
	// Zstd compresses clusters with zstd (compression_type 1), QEMU's
	// default level 3 unless Options.Level says otherwise.
	Zstd Compression = iota
	// Zlib compresses clusters with raw deflate and a 4 KiB window, exactly
	// the stream QEMU's zlib compression type reads (compression_type 0).
	Zlib
	// None stores every non-zero cluster uncompressed.
	None
)

// String returns the name qemu-img uses ("zstd", "zlib") or "none".
func (c Compression) String() string {
	switch c {
	case Zstd:
		return "zstd"
	case Zlib:
		return "zlib"
	case None:
		return "none"
	}
	return fmt.Sprintf("Compression(%d)", int(c))
}

// ParseCompression parses "zstd", "zlib" or "none" (the String forms).
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "zstd":
		return Zstd, nil
	case "zlib":
		return Zlib, nil
	case "none":
		return None, nil
	}
	return 0, fmt.Errorf("%w: unknown compression %q (want zstd, zlib or none)", ErrInvalidOptions, s)
}

// Updater receives progress: Update(n) is called with the number of bytes of
// the virtual disk consumed since the previous call (gaps included), so the
// calls sum to the virtual size once Close returns.
type Updater interface{ Update(n int64) }

// Options configure a Writer. The zero value is the default: 64 KiB
// clusters, zstd at level 3, one worker per CPU, no progress.
type Options struct {
	// ClusterBits is log2 of the cluster size, 9 (512 B) to 21 (2 MiB).
	// 0 means 16 (64 KiB).
	ClusterBits int
	// Compression of guest clusters; the zero value is Zstd.
	Compression Compression
	// Level is the codec's level: zstd 1 to 22 (0 means 3, as QEMU);
	// klauspost/compress maps it to its nearest speed (1-2 fastest, 3-5
	// default, 6-9 better, 10-22 best). Zlib and None take no level (must
	// be 0): the deflate encoder with QEMU's 4 KiB window has one setting.
	Level int
	// Workers is the number of compression goroutines; 0 means
	// runtime.GOMAXPROCS(0). The output does not depend on it.
	Workers int
	// Progress, if not nil, receives the bytes of virtual disk consumed.
	Progress Updater
}

const (
	minClusterBits     = 9
	maxClusterBits     = 21
	defaultClusterBits = 16
	defaultZstdLevel   = 3
)

// Validate reports whether the options are usable.
func (o Options) Validate() error {
	if o.ClusterBits != 0 && (o.ClusterBits < minClusterBits || o.ClusterBits > maxClusterBits) {
		return fmt.Errorf("%w: ClusterBits %d out of range: want 0 (default 16) or %d to %d",
			ErrInvalidOptions, o.ClusterBits, minClusterBits, maxClusterBits)
	}
	switch o.Compression {
	case Zstd:
		if o.Level < 0 || o.Level > 22 {
			return fmt.Errorf("%w: zstd level %d out of range: want 0 (default 3) or 1 to 22", ErrInvalidOptions, o.Level)
		}
	case Zlib, None:
		if o.Level != 0 {
			return fmt.Errorf("%w: compression %s takes no level: got %d, want 0", ErrInvalidOptions, o.Compression, o.Level)
		}
	default:
		return fmt.Errorf("%w: unknown compression %d", ErrInvalidOptions, int(o.Compression))
	}
	if o.Workers < 0 {
		return fmt.Errorf("%w: Workers %d is negative: want 0 (one per CPU) or more", ErrInvalidOptions, o.Workers)
	}
	return nil
}

// withDefaults returns o with the zero fields replaced by their defaults.
func (o Options) withDefaults() Options {
	if o.ClusterBits == 0 {
		o.ClusterBits = defaultClusterBits
	}
	if o.Compression == Zstd && o.Level == 0 {
		o.Level = defaultZstdLevel
	}
	if o.Workers == 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	return o
}
