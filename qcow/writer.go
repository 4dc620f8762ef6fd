package qcow

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
)

// On-disk constants from docs/interop/qcow2.txt.
const (
	magic             = 0x514649fb // "QFI\xfb"
	version           = 3
	headerLength      = 112 // 104 bytes of v3 fields + compression_type, padded to 8
	refcountOrder     = 4   // 16-bit refcounts
	sectorSize        = 512
	incompatCompress  = 1 << 3 // "compression type" incompatible feature bit
	oflagCopied       = 1 << 63
	oflagCompressed   = 1 << 62
	compressionZlib   = 0
	compressionZstd   = 1
	zlibWindow        = 4096     // QEMU inflates with windowBits -12
	maxL1Bytes        = 32 << 20 // QEMU's implementation limit
	maxRefTableBytes  = 8 << 20  // QEMU's implementation limit
	maxHostOffsetBits = 56
)

// Stats describes what a Writer stored. Valid after Close.
type Stats struct {
	GuestClusters      int64 // guest clusters of the virtual disk
	ZeroClusters       int64 // left unallocated because all zero (or never written)
	CompressedClusters int64 // stored compressed
	RawClusters        int64 // stored uncompressed
	MetadataClusters   int64 // header, L1, L2, refcount table and blocks
	PackClusters       int64 // host clusters holding compressed data
	FileSize           int64 // bytes of the qcow2 file
}

// Writer writes a qcow2 image. Data goes in with WriteAt at ascending offsets;
// Close writes the metadata. A Writer is not safe for concurrent use.
// Errors are sticky: after a failure every call returns the first error.
type Writer struct {
	dst         io.WriterAt
	opts        Options
	virtualSize int64
	cs          int64 // cluster size
	pos         int64 // end of the last write (virtual)
	err         error
	closed      bool

	cur    []byte // cluster being assembled, nil if none
	curIdx int64  // its guest cluster index

	// pipeline
	pool    sync.Pool // cluster input buffers
	outPool sync.Pool // compressed output buffers
	work    chan *job
	queue   []*job
	wg      sync.WaitGroup

	// allocation
	nextHost  int64      // next free host cluster index
	refcounts []uint16   // per host cluster
	l2        [][]uint64 // per L1 index, nil when all entries are zero
	l2Entries int64
	packIdx   int64 // host cluster holding packed compressed data, -1 if none
	packUsed  int64 // bytes used in it
	packBuf   []byte
	csizeBits uint // x in the compressed cluster descriptor

	stats Stats
}

type jobKind int

const (
	kindZero jobKind = iota
	kindRaw
	kindCompressed
)

type job struct {
	idx  int64   // guest cluster index
	in   *[]byte // cluster data (pooled)
	out  []byte  // compressed data, when kind == kindCompressed
	kind jobKind
	done chan struct{}
}

// NewWriter returns a Writer that writes a qcow2 image of virtualSize bytes
// to dst. virtualSize must be a multiple of 512. The writer starts its
// compression goroutines here; call Close to finish the image and stop them.
func NewWriter(dst io.WriterAt, virtualSize int64, opts Options) (*Writer, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	if virtualSize < 0 || virtualSize%sectorSize != 0 {
		return nil, fmt.Errorf("%w: got %d bytes, want a non-negative multiple of %d", ErrInvalidSize, virtualSize, sectorSize)
	}
	cs := int64(1) << opts.ClusterBits
	l2Entries := cs / 8
	guestClusters := (virtualSize + cs - 1) / cs
	l1Size := max((guestClusters+l2Entries-1)/l2Entries, 1)
	if l1Size*8 > maxL1Bytes {
		return nil, fmt.Errorf("%w: %d bytes needs an L1 table of %d bytes, QEMU reads at most %d; use larger clusters",
			ErrInvalidSize, virtualSize, l1Size*8, maxL1Bytes)
	}
	w := &Writer{
		dst:         dst,
		opts:        opts,
		virtualSize: virtualSize,
		cs:          cs,
		curIdx:      -1,
		l2:          make([][]uint64, l1Size),
		l2Entries:   l2Entries,
		packIdx:     -1,
		csizeBits:   uint(62 - (opts.ClusterBits - 8)),
	}
	w.stats.GuestClusters = guestClusters
	w.pool.New = func() any { b := make([]byte, cs); return &b }
	w.outPool.New = func() any { b := make([]byte, 0, cs+cs/8); return &b }
	w.allocCluster() // cluster 0: the header
	// Enough clusters in flight that workers never idle while the caller
	// is busy elsewhere (hashing the same data, reading the next chunk):
	// 32 per worker is 2 MiB each at 64 KiB clusters.
	inflight := 32 * opts.Workers
	w.work = make(chan *job, inflight)
	for range opts.Workers {
		c, err := newCompressor(opts, int(cs), &w.outPool)
		if err != nil {
			close(w.work)
			w.wg.Wait()
			return nil, err
		}
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			for j := range w.work {
				c.do(j)
				close(j.done)
			}
		}()
	}
	return w, nil
}

// WriteAt writes guest data at virtual offset off. Offsets must ascend: off
// must be at or after the end of the previous write. Skipped ranges read as
// zeros. A partial cluster is kept until the next write or Close completes it.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	if w.closed {
		return 0, ErrWriteAfterClose
	}
	if w.err != nil {
		return 0, w.err
	}
	if off < w.pos {
		return 0, fmt.Errorf("%w: got offset %d, want at least %d (the end of the previous write)", ErrNotAscending, off, w.pos)
	}
	if off > w.virtualSize || int64(len(p)) > w.virtualSize-off {
		return 0, fmt.Errorf("%w: got %d bytes at offset %d, virtual size is %d", ErrBeyondEnd, len(p), off, w.virtualSize)
	}
	start := w.pos
	n := len(p)
	for len(p) > 0 {
		ci := off / w.cs
		if w.cur != nil && w.curIdx != ci {
			w.submitCur()
		}
		if w.cur == nil {
			b := w.pool.Get().(*[]byte)
			clear(*b)
			w.cur, w.curIdx = *b, ci
		}
		o := off % w.cs
		c := copy(w.cur[o:], p)
		p = p[c:]
		off += int64(c)
		if o+int64(c) == w.cs {
			w.submitCur()
		}
		if w.err != nil {
			return 0, w.err
		}
	}
	w.pos = off
	if w.opts.Progress != nil && w.pos > start {
		w.opts.Progress.Update(w.pos - start)
	}
	return n, nil
}

// Close completes a pending partial cluster, waits for the compression
// goroutines, and writes the L2, L1 and refcount tables and the header. It
// does not close dst. Calling Close again returns the first call's result.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	w.closed = true
	if w.err == nil && w.cur != nil {
		w.submitCur()
	}
	for len(w.queue) > 0 {
		w.retire()
	}
	close(w.work)
	w.wg.Wait()
	if w.err != nil {
		return w.err
	}
	w.flushPack()
	if w.err == nil {
		w.err = w.writeMetadata()
	}
	if w.err == nil && w.opts.Progress != nil && w.virtualSize > w.pos {
		w.opts.Progress.Update(w.virtualSize - w.pos)
	}
	return w.err
}

// Stats returns what was written; complete after a successful Close.
func (w *Writer) Stats() Stats { return w.stats }

func (w *Writer) submitCur() {
	b := w.cur
	j := &job{idx: w.curIdx, in: &b, done: make(chan struct{})}
	w.cur, w.curIdx = nil, -1
	w.queue = append(w.queue, j)
	w.work <- j
	if len(w.queue) >= cap(w.work) {
		w.retire()
	}
}

// retire waits for the oldest job and places its result: results are placed
// in guest order whatever order the workers finish in.
func (w *Writer) retire() {
	j := w.queue[0]
	w.queue[0] = nil
	w.queue = w.queue[1:]
	<-j.done
	if w.err == nil {
		w.place(j)
	}
	w.pool.Put(j.in)
	if j.out != nil {
		w.outPool.Put(&j.out)
	}
}

func (w *Writer) place(j *job) {
	switch j.kind {
	case kindZero:
	case kindRaw:
		w.stats.RawClusters++
		h := w.allocCluster()
		w.refcounts[h] = 1
		w.setL2(j.idx, uint64(h*w.cs)|oflagCopied)
		w.writeAt(*j.in, h*w.cs)
	case kindCompressed:
		w.stats.CompressedClusters++
		w.placeCompressed(j.idx, j.out)
	}
}

func (w *Writer) placeCompressed(idx int64, data []byte) {
	// Compressed clusters are packed byte by byte, as QEMU packs them: the
	// descriptor holds a byte offset and the count of further 512-byte
	// sectors the data touches, and readers ignore what follows the data.
	n := int64(len(data))
	if w.packIdx >= 0 && w.packUsed+n > w.cs && w.packIdx+1 != w.nextHost {
		// It would span into the next host cluster, which is taken.
		w.flushPack()
	}
	if w.packIdx < 0 {
		w.packIdx = w.allocCluster()
		w.stats.PackClusters++
		w.packUsed = 0
		if w.packBuf == nil {
			w.packBuf = make([]byte, w.cs)
		}
	}
	hostOff := w.packIdx*w.cs + w.packUsed
	if hostOff>>w.csizeBits != 0 || hostOff>>maxHostOffsetBits != 0 {
		w.err = fmt.Errorf("qcow: image too large: compressed cluster at host offset %d does not fit the descriptor", hostOff)
		return
	}
	sectors := uint64((hostOff+n-1)/sectorSize - hostOff/sectorSize)
	w.setL2(idx, oflagCompressed|sectors<<w.csizeBits|uint64(hostOff))
	w.refcounts[w.packIdx]++
	c := copy(w.packBuf[w.packUsed:], data)
	w.packUsed += n
	if w.packUsed >= w.cs {
		// Ends exactly at, or spans past, the end of this host cluster;
		// the next one is contiguous (checked above).
		used := w.packUsed - w.cs
		w.flushPack()
		if used > 0 {
			w.packIdx = w.allocCluster()
			w.stats.PackClusters++
			w.packUsed = used
			copy(w.packBuf, data[c:])
			w.refcounts[w.packIdx]++
		}
	}
}

// flushPack writes the current pack cluster (zero-padded) and closes it.
func (w *Writer) flushPack() {
	if w.packIdx < 0 {
		return
	}
	w.writeAt(w.packBuf, w.packIdx*w.cs)
	clear(w.packBuf)
	w.packIdx, w.packUsed = -1, 0
}

func (w *Writer) allocCluster() int64 {
	h := w.nextHost
	w.nextHost++
	w.refcounts = append(w.refcounts, 0)
	return h
}

func (w *Writer) setL2(idx int64, entry uint64) {
	t := w.l2[idx/w.l2Entries]
	if t == nil {
		t = make([]uint64, w.l2Entries)
		w.l2[idx/w.l2Entries] = t
	}
	t[idx%w.l2Entries] = entry
}

func (w *Writer) writeAt(b []byte, off int64) {
	if w.err != nil {
		return
	}
	if _, err := w.dst.WriteAt(b, off); err != nil {
		w.err = fmt.Errorf("qcow: writing %d bytes at %d: %w", len(b), off, err)
	}
}

// writeMetadata appends the L2 tables, the L1 table, the refcount blocks and
// the refcount table, then writes the header into cluster 0.
func (w *Writer) writeMetadata() error {
	l1 := w.writeL2Tables()
	l1Off := w.writeL1Table(l1)
	tableOff, tableClusters, err := w.writeRefcounts()
	if err != nil {
		return err
	}
	w.writeHeader(len(l1), l1Off, tableOff, tableClusters)
	w.stats.MetadataClusters = w.nextHost - w.stats.RawClusters - w.stats.PackClusters
	w.stats.FileSize = w.nextHost * w.cs
	w.stats.ZeroClusters = w.stats.GuestClusters - w.stats.RawClusters - w.stats.CompressedClusters
	return w.err
}

// writeL2Tables appends the L2 tables in use and returns the L1 table
// pointing at them.
func (w *Writer) writeL2Tables() []uint64 {
	buf := make([]byte, w.cs)
	l1 := make([]uint64, len(w.l2))
	for i, t := range w.l2 {
		if t == nil {
			continue
		}
		h := w.allocCluster()
		w.refcounts[h] = 1
		for k, e := range t {
			binary.BigEndian.PutUint64(buf[8*k:], e)
		}
		w.writeAt(buf, h*w.cs)
		l1[i] = uint64(h*w.cs) | oflagCopied
	}
	return l1
}

// writeL1Table appends the L1 table and returns its offset.
func (w *Writer) writeL1Table(l1 []uint64) int64 {
	l1Off := w.nextHost * w.cs
	l1Clusters := (int64(len(l1))*8 + w.cs - 1) / w.cs
	for range l1Clusters {
		w.refcounts[w.allocCluster()] = 1
	}
	l1Buf := make([]byte, l1Clusters*w.cs)
	for i, e := range l1 {
		binary.BigEndian.PutUint64(l1Buf[8*i:], e)
	}
	w.writeAt(l1Buf, l1Off)
	return l1Off
}

// refcountSize returns how many refcount blocks and table clusters cover
// base clusters and themselves: the fixed point.
func (w *Writer) refcountSize(base int64) (blocks, tableClusters int64) {
	rbEntries := w.cs * 8 / (1 << refcountOrder)
	for {
		total := base + blocks + tableClusters
		nb := (total + rbEntries - 1) / rbEntries
		nt := (nb*8 + w.cs - 1) / w.cs
		if nb == blocks && nt == tableClusters {
			return blocks, tableClusters
		}
		blocks, tableClusters = nb, nt
	}
}

// writeRefcounts appends the refcount blocks, which count every cluster
// (the header, themselves and the table included), and the refcount table.
func (w *Writer) writeRefcounts() (tableOff, tableClusters int64, err error) {
	base := w.nextHost
	blocks, tableClusters := w.refcountSize(base)
	if tableClusters*w.cs > maxRefTableBytes {
		return 0, 0, fmt.Errorf("qcow: image too large: refcount table of %d bytes, QEMU reads at most %d", tableClusters*w.cs, maxRefTableBytes)
	}
	blocksStart := w.nextHost
	for range blocks + tableClusters {
		w.refcounts[w.allocCluster()] = 1
	}
	w.refcounts[0] = 1 // header
	if w.nextHost != base+blocks+tableClusters {
		return 0, 0, fmt.Errorf("BUG: qcow: %d host clusters allocated, want %d", w.nextHost, base+blocks+tableClusters)
	}
	rbEntries := w.cs * 8 / (1 << refcountOrder)
	buf := make([]byte, w.cs)
	for b := range blocks {
		clear(buf)
		lo := b * rbEntries
		hi := min(lo+rbEntries, w.nextHost)
		for i := lo; i < hi; i++ {
			binary.BigEndian.PutUint16(buf[2*(i-lo):], w.refcounts[i])
		}
		w.writeAt(buf, (blocksStart+b)*w.cs)
	}
	tableOff = (blocksStart + blocks) * w.cs
	table := make([]byte, tableClusters*w.cs)
	for b := range blocks {
		binary.BigEndian.PutUint64(table[8*b:], uint64((blocksStart+b)*w.cs))
	}
	w.writeAt(table, tableOff)
	return tableOff, tableClusters, nil
}

// writeHeader writes the header (cluster 0).
func (w *Writer) writeHeader(l1Len int, l1Off, tableOff, tableClusters int64) {
	h := make([]byte, w.cs)
	be := binary.BigEndian
	be.PutUint32(h[0:], magic)
	be.PutUint32(h[4:], version)
	// 8: backing_file_offset, 16: backing_file_size = 0
	be.PutUint32(h[20:], uint32(w.opts.ClusterBits))
	be.PutUint64(h[24:], uint64(w.virtualSize))
	// 32: crypt_method = 0
	be.PutUint32(h[36:], uint32(l1Len))
	be.PutUint64(h[40:], uint64(l1Off))
	be.PutUint64(h[48:], uint64(tableOff))
	be.PutUint32(h[56:], uint32(tableClusters))
	// 60: nb_snapshots, 64: snapshots_offset = 0
	if w.opts.Compression == Zstd {
		be.PutUint64(h[72:], incompatCompress)
		h[104] = compressionZstd
	}
	// 80: compatible_features, 88: autoclear_features = 0
	be.PutUint32(h[96:], refcountOrder)
	be.PutUint32(h[100:], headerLength)
	// The header extension area ends with an end marker (type 0, length
	// 0) at headerLength, already zero.
	w.writeAt(h, 0)
}

// compressor is one worker's codec state.
type compressor struct {
	outPool *sync.Pool // shared by all workers; the writer returns buffers
	kind    Compression
	cs      int
	zenc    *zstd.Encoder
	fw      *flate.Writer
	fbuf    bytes.Buffer
}

func newCompressor(o Options, cs int, outPool *sync.Pool) (*compressor, error) {
	c := &compressor{kind: o.Compression, cs: cs, outPool: outPool}
	switch o.Compression {
	case Zstd:
		enc, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(o.Level)),
			zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false),
			zstd.WithZeroFrames(true),
			zstd.WithWindowSize(windowFor(cs)),
		)
		if err != nil {
			return nil, fmt.Errorf("qcow: zstd encoder: %w", err)
		}
		c.zenc = enc
	case Zlib:
		fw, err := flate.NewWriterWindow(&c.fbuf, zlibWindow)
		if err != nil {
			return nil, fmt.Errorf("qcow: deflate encoder: %w", err)
		}
		c.fw = fw
	}
	return c, nil
}

// windowFor returns the smallest zstd window (a power of two, at least 1 KiB)
// that covers a cluster.
func windowFor(cs int) int {
	w := zstd.MinWindowSize
	for w < cs {
		w <<= 1
	}
	return w
}

func (c *compressor) do(j *job) {
	in := *j.in
	if zeros.All(in) {
		j.kind = kindZero
		return
	}
	j.kind = kindRaw
	switch c.kind {
	case Zstd:
		j.out = c.zenc.EncodeAll(in, c.outBuf())
	case Zlib:
		c.fbuf.Reset()
		c.fw.Reset(&c.fbuf)
		if _, err := c.fw.Write(in); err != nil {
			return // cannot fail writing to a bytes.Buffer; store raw
		}
		if err := c.fw.Close(); err != nil {
			return
		}
		j.out = append(c.outBuf(), c.fbuf.Bytes()...)
	default:
		return
	}
	if len(j.out) < c.cs {
		j.kind = kindCompressed
	} else {
		c.outPool.Put(&j.out)
		j.out = nil
	}
}

// outBuf returns an empty buffer for compressed output.
func (c *compressor) outBuf() []byte {
	return (*c.outPool.Get().(*[]byte))[:0]
}
