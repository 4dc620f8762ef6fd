package imagebuild

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
)

type writerAt interface {
	WriteAt(p []byte, off int64) (int, error)
}

// copySparse feeds the data regions of src to every sink in ascending
// order, skipping holes (SEEK_DATA/SEEK_HOLE), so a mostly empty disk costs
// only its data. Each sink runs on its own goroutine over the same read-only
// chunks, so hashing and compression overlap with each other and with
// reading. Progress counts the virtual disk, holes included.
func copySparse(ctx context.Context, src *os.File, size int64, sinks []writerAt, pr Progress) error {
	const seekData, seekHole = 3, 4
	const chunk, chunks = 4 << 20, 8
	pool := newBufferPool(chunks, chunk)
	type piece struct {
		data []byte
		off  int64
		refs *atomic.Int32
	}
	feeds := make([]chan piece, len(sinks))
	errs := make(chan error, len(sinks))
	var wg sync.WaitGroup
	for i, s := range sinks {
		feeds[i] = make(chan piece, chunks)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			for p := range feeds[i] {
				if err == nil {
					_, err = s.WriteAt(p.data, p.off)
				}
				if p.refs.Add(-1) == 0 {
					pool <- p.data[:cap(p.data)]
				}
			}
			errs <- err
		}()
	}
	finish := func(err error) error {
		for _, f := range feeds {
			close(f)
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			if err == nil {
				err = e
			}
		}
		return err
	}

	var off, reported int64
	report := func(pos int64) {
		if pr != nil && pos > reported {
			pr.Add(pos - reported)
			reported = pos
		}
	}
	for off < size {
		if err := ctx.Err(); err != nil {
			return finish(err)
		}
		data, err := src.Seek(off, seekData)
		if err != nil {
			break // ENXIO: no data after off
		}
		hole, err := src.Seek(data, seekHole)
		if err != nil {
			return finish(fmt.Errorf("seek hole in raw disk: %w", err))
		}
		// Align to blocks; the sinks take ascending, overlapping-free data.
		data &^= blockSize - 1
		if data < off {
			data = off
		}
		hole = min((hole+blockSize-1)&^(blockSize-1), size)
		for pos := data; pos < hole; {
			n := int(min(chunk, hole-pos))
			buf := <-pool
			if _, err := src.ReadAt(buf[:n], pos); err != nil && err != io.EOF {
				pool <- buf
				return finish(fmt.Errorf("read raw disk: %w", err))
			}
			if isZero(buf[:n]) {
				pool <- buf
			} else {
				refs := new(atomic.Int32)
				refs.Store(int32(len(sinks)))
				for _, f := range feeds {
					f <- piece{buf[:n], pos, refs}
				}
			}
			pos += int64(n)
			report(pos)
		}
		off = hole
	}
	if err := finish(nil); err != nil {
		return err
	}
	report(size)
	return nil
}

func isZero(b []byte) bool {
	return len(b) == 0 || (b[0] == 0 && bytes.Equal(b[:len(b)-1], b[1:]))
}
