package imagebuild

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixvm-image/nixvm-image/internal/zeros"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/partition"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// packed is a finished image, synced, not yet published.
type packed struct {
	file     *os.File // the qcow2 temporary, or the raw disk itself
	manifest *manifest.Manifest
	size     int64 // bytes of file
}

// pack is the fifth phase: one pass over the raw disk's data feeds the
// qcow2 writer (for FormatQcow2) and the manifest's block hasher.
func (b *builder) pack(raw *os.File, plan *partition.Plan) (*packed, error) {
	o := &b.opts
	hasher := manifest.NewHasher(plan.DiskSize, o.Workers)
	sinks := []writerAt{hasher}
	out := raw
	var qw *qcow.Writer
	if o.Format == FormatQcow2 {
		var err error
		if out, err = b.tempFile(".tmp"); err != nil {
			return nil, err
		}
		qw, err = qcow.NewWriter(out, plan.DiskSize, qcow.Options{Compression: o.Compression, Level: o.Level, Workers: o.Workers})
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, qw)
	}
	if o.Progress != nil {
		o.Progress.Phase("pack "+string(o.Format), plan.DiskSize)
	}
	t0 := time.Now()
	if err := copySparse(b.ctx, raw, plan.DiskSize, sinks, o.Progress); err != nil {
		return nil, err
	}
	if qw != nil {
		if err := qw.Close(); err != nil {
			return nil, err
		}
		b.logf("packed qcow2 (%s compression) and block manifest (%s)", o.Compression, since(t0))
	} else {
		b.logf("hashed the raw disk for the block manifest (%s)", since(t0))
	}
	m, err := hasher.Finish()
	if err != nil {
		return nil, err
	}
	m.Layout = b.layout
	t0 = time.Now()
	if err := out.Sync(); err != nil {
		return nil, err
	}
	b.logf("synced %s to disk (%s)", o.Output, since(t0))
	fi, err := out.Stat()
	if err != nil {
		return nil, err
	}
	return &packed{file: out, manifest: m, size: fi.Size()}, nil
}

type writerAt interface {
	WriteAt(p []byte, off int64) (int, error)
}

// Reading the raw disk: chunks of chunkSize, at most chunks in flight.
const chunkSize, chunks = 4 << 20, 8

// piece is a chunk of the raw disk on its way to the sinks; the last sink
// done with it returns its buffer to the pool.
type piece struct {
	data []byte
	off  int64
	refs *atomic.Int32
}

// fanout runs one goroutine per sink, each writing the pieces it is sent
// in order. After the first error a sink only returns buffers.
type fanout struct {
	feeds []chan piece
	errs  chan error
	wg    sync.WaitGroup
	pool  chan []byte
}

func newFanout(sinks []writerAt, pool chan []byte) *fanout {
	f := &fanout{feeds: make([]chan piece, len(sinks)), errs: make(chan error, len(sinks)), pool: pool}
	for i, s := range sinks {
		f.feeds[i] = make(chan piece, chunks)
		f.wg.Add(1)
		go f.run(s, f.feeds[i])
	}
	return f
}

func (f *fanout) run(s writerAt, feed chan piece) {
	defer f.wg.Done()
	var err error
	for p := range feed {
		if err == nil {
			_, err = s.WriteAt(p.data, p.off)
		}
		if p.refs.Add(-1) == 0 {
			f.pool <- p.data[:cap(p.data)]
		}
	}
	f.errs <- err
}

// send hands data at off to every sink; the buffer belongs to the sinks.
func (f *fanout) send(data []byte, off int64) {
	refs := new(atomic.Int32)
	refs.Store(int32(len(f.feeds)))
	for _, feed := range f.feeds {
		feed <- piece{data, off, refs}
	}
}

// finish waits for the sinks and returns err, else the first sink error.
func (f *fanout) finish(err error) error {
	for _, feed := range f.feeds {
		close(feed)
	}
	f.wg.Wait()
	close(f.errs)
	for e := range f.errs {
		if err == nil {
			err = e
		}
	}
	return err
}

// copySparse feeds the data regions of src to every sink in ascending
// order, skipping holes (SEEK_DATA/SEEK_HOLE), so a mostly empty disk costs
// only its data. Each sink runs on its own goroutine over the same read-only
// chunks, so hashing and compression overlap with each other and with
// reading. Progress counts the virtual disk, holes included.
func copySparse(ctx context.Context, src *os.File, size int64, sinks []writerAt, pr Progress) error {
	pool := newBufferPool(chunks, chunkSize)
	f := newFanout(sinks, pool)
	var reported int64
	report := func(pos int64) {
		if pr != nil && pos > reported {
			pr.Add(pos - reported)
			reported = pos
		}
	}
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return f.finish(err)
		}
		data, hole, ok, err := nextData(src, off, size)
		if err != nil {
			return f.finish(err)
		}
		if !ok {
			break
		}
		if err := f.sendRegion(src, data, hole, report); err != nil {
			return f.finish(err)
		}
		off = hole
	}
	if err := f.finish(nil); err != nil {
		return err
	}
	report(size)
	return nil
}

// nextData returns the next data region of src at or after off, aligned to
// blocks and clipped to [off, size); ok is false when only holes remain. A
// file system that cannot report holes has data everywhere.
func nextData(src *os.File, off, size int64) (data, hole int64, ok bool, err error) {
	data, err = src.Seek(off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return 0, 0, false, nil // no data after off
	case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
		return off, size, true, nil
	case err != nil:
		return 0, 0, false, fmt.Errorf("seek data in raw disk: %w", err)
	}
	hole, err = src.Seek(data, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, false, fmt.Errorf("seek hole in raw disk: %w", err)
	}
	// Align to blocks; the sinks take ascending, overlapping-free data.
	data &^= blockSize - 1
	if data < off {
		data = off
	}
	hole = min((hole+blockSize-1)&^(blockSize-1), size)
	return data, hole, true, nil
}

// sendRegion reads [data, hole) of src in chunks and sends those that are
// not all zero.
func (f *fanout) sendRegion(src *os.File, data, hole int64, report func(int64)) error {
	for pos := data; pos < hole; {
		n := int(min(chunkSize, hole-pos))
		buf := <-f.pool
		if _, err := src.ReadAt(buf[:n], pos); err != nil && err != io.EOF {
			f.pool <- buf
			return fmt.Errorf("read raw disk: %w", err)
		}
		if zeros.All(buf[:n]) {
			f.pool <- buf
		} else {
			f.send(buf[:n], pos)
		}
		pos += int64(n)
		report(pos)
	}
	return nil
}
