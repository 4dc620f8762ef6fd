package imagebuild

import "github.com/nixvm-image/nixvm-image/nixclosure"

// narPipe computes one store path's NAR hash on its own goroutine, so that
// SHA-256 runs beside the ext4 writes instead of after them. File data
// travels in buffers from a shared pool: the reader takes one, fills it,
// writes it to the image and hands it here; the hasher returns it to the
// pool when done. Order is kept, so the hash is the same as inline.
type narPipe struct {
	ops  chan narOp
	pool chan []byte
	done chan narResult
}

type narOp struct {
	hdr  *nixclosure.NarHeader
	data []byte
}

type narResult struct {
	hash string
	size uint64
	err  error
}

// newBufferPool returns a pool of n buffers of size bytes.
func newBufferPool(n, size int) chan []byte {
	pool := make(chan []byte, n)
	for range n {
		pool <- make([]byte, size)
	}
	return pool
}

func newNarPipe(pool chan []byte) *narPipe {
	p := &narPipe{ops: make(chan narOp, cap(pool)), pool: pool, done: make(chan narResult, 1)}
	go p.run()
	return p
}

func (p *narPipe) run() {
	nh := nixclosure.NewNarHasher()
	var err error
	for op := range p.ops {
		switch {
		case err != nil:
		case op.hdr != nil:
			err = nh.WriteHeader(op.hdr)
		default:
			_, err = nh.Write(op.data)
		}
		if op.data != nil {
			p.pool <- op.data[:cap(op.data)]
		}
	}
	if err == nil {
		err = nh.Close()
	}
	hash, size := nh.Sum()
	p.done <- narResult{hash, size, err}
}

// header queues a NAR entry header.
func (p *narPipe) header(h *nixclosure.NarHeader) { p.ops <- narOp{hdr: h} }

// data queues file bytes; the buffer belongs to the pipe from now on.
func (p *narPipe) data(b []byte) { p.ops <- narOp{data: b} }

// finish waits for the hash: "sha256:<nix32>" and the NAR size.
func (p *narPipe) finish() (string, uint64, error) {
	close(p.ops)
	r := <-p.done
	return r.hash, r.size, r.err
}
