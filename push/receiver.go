package push

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// receiver applies the sender's stream to a partial generation.
type receiver struct {
	s       *session
	h       *hello
	l       *store.Lock
	p       *store.Partial
	idx     [][]manifest.Hash // [gen] block hashes; idx[0] unused (self = p.Hashes)
	gens    []store.Generation
	readers map[int]*store.Reader
	dec     *zstd.Decoder
	buf     []byte
	fixup   bool // re-sending missing blocks: literals only
}

func (rc *receiver) closeReaders() {
	for _, r := range rc.readers {
		r.Close()
	}
	if rc.dec != nil {
		rc.dec.Close()
	}
}

// stream reads frames until the generation is committed or the session fails.
func (rc *receiver) stream(ctx context.Context) error {
	var err error
	rc.dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxLiteralBlocks*manifest.BlockSize+(1<<20)), zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		return err
	}
	rc.buf = make([]byte, maxLiteralBlocks*manifest.BlockSize)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		typ, payload, err := rc.s.read()
		if err != nil {
			return err
		}
		o, err := decodeOp(typ, payload, rc.p.Blocks(), len(rc.gens))
		if err != nil {
			return err
		}
		done, err := rc.apply(o)
		if err != nil || done {
			return err
		}
	}
}

// apply handles one frame; done is true once the generation is committed.
func (rc *receiver) apply(o *op) (done bool, err error) {
	p := rc.p
	if o.Type != frameEnd && o.Type != frameCheckpoint {
		if rc.fixup && o.Type != frameLiteral {
			return false, protoErr("frame type %d while re-sending missing blocks", o.Type)
		}
		if !rc.fixup && o.Start != p.Next {
			return false, protoErr("blocks out of order: got run at %d, want %d", o.Start, p.Next)
		}
	}
	switch o.Type {
	case frameZero:
		for i := o.Start; i < o.Start+o.Count; i++ {
			p.Hashes[i] = manifest.ZeroHash()
		}
		p.Next += o.Count
	case frameCopy:
		if err := rc.copyRun(o); err != nil {
			return false, err
		}
		p.Next += o.Count
	case frameLiteral:
		return false, rc.literal(o)
	case frameCheckpoint:
		if o.Start != p.Next {
			return false, protoErr("checkpoint at %d, but %d blocks arrived", o.Start, p.Next)
		}
		return false, rc.checkpoint()
	case frameEnd:
		return rc.end()
	}
	return false, nil
}

func (rc *receiver) checkpoint() error {
	if err := rc.p.Checkpoint(); err != nil {
		return fmt.Errorf("push: saving progress of %q: %w", rc.h.Name, err)
	}
	return nil
}

// end answers End: the ranges still missing, or, with none, the result of
// committing and activating the generation.
func (rc *receiver) end() (done bool, err error) {
	p := rc.p
	if p.Next != p.Blocks() {
		return false, protoErr("end of stream after %d blocks, want %d", p.Next, p.Blocks())
	}
	if len(p.Missing) > 0 {
		if err := rc.checkpoint(); err != nil {
			return false, err
		}
		rc.fixup = true
		res := &result{Missing: runsOf(p.Missing)}
		if len(res.Missing) > maxRanges {
			res.Missing = res.Missing[:maxRanges]
		}
		rc.s.fw.frame(frameResult, res.encode(&rc.s.e))
		return false, rc.s.fw.flush()
	}
	if got := manifest.ComputeDigest(p.Hashes); got != rc.h.Digest {
		err := fmt.Errorf("%w: the received image has digest %x, the sender announced %x (a stale IMAGE.manifest beside the image? delete it); push again", store.ErrDigest, got, rc.h.Digest)
		return false, errors.Join(err, p.Discard()) // start over next time
	}
	if _, err := p.Commit(); err != nil {
		return false, err
	}
	if err := rc.l.Activate(rc.h.Digest, rc.h.Link); err != nil {
		return false, err
	}
	rc.s.fw.frame(frameResult, (&result{}).encode(&rc.s.e))
	return true, rc.s.fw.flush()
}

func runsOf(set map[int64]bool) []run {
	var bs []int64
	for b := range set {
		bs = append(bs, b)
	}
	slices.Sort(bs)
	var rs []run
	for _, b := range bs {
		if n := len(rs); n > 0 && rs[n-1].Start+rs[n-1].Count == b {
			rs[n-1].Count++
		} else {
			rs = append(rs, run{b, 1})
		}
	}
	return rs
}

// literal writes a zstd frame's blocks: in the stream, or a re-sent
// missing block during fixup.
func (rc *receiver) literal(o *op) error {
	p := rc.p
	if rc.fixup {
		for i := o.Start; i < o.Start+o.Count; i++ {
			if !p.Missing[i] {
				return protoErr("re-sent block %d was not missing", i)
			}
		}
	}
	want := int(o.Count) * manifest.BlockSize
	out, err := rc.dec.DecodeAll(o.Data, rc.buf[:0])
	if err != nil {
		return protoErr("literal at block %d: %v", o.Start, err)
	}
	if len(out) != want {
		return protoErr("literal at block %d: got %d bytes, want %d", o.Start, len(out), want)
	}
	for i := int64(0); i < o.Count; i++ {
		p.Hashes[o.Start+i] = manifest.HashBlock(out[i*manifest.BlockSize : (i+1)*manifest.BlockSize])
	}
	if err := p.WriteBlocks(o.Start, out); err != nil {
		return fmt.Errorf("push: writing the received image: %w", err)
	}
	if !rc.fixup {
		p.Next += o.Count
		return nil
	}
	for i := o.Start; i < o.Start+o.Count; i++ {
		p.Fill(i)
	}
	return nil
}

// copyRun copies blocks the host already holds, checking each source block
// against its recorded hash and the run against the sender's sum. Blocks
// that fail are recorded as missing and asked for again at the end.
func (rc *receiver) copyRun(o *op) error {
	src, read, err := rc.copySource(o)
	if err != nil {
		return err
	}
	if src == nil || o.Src+o.Count > int64(len(src)) || runSum(src[o.Src:o.Src+o.Count]) != o.Sum {
		// No index, or the sender matched a hash prefix that is not the
		// block it wants.
		for i := o.Start; i < o.Start+o.Count; i++ {
			rc.p.Missing[i] = true
		}
		return nil
	}
	expect := src[o.Src : o.Src+o.Count]
	for done := int64(0); done < o.Count; {
		n := min(o.Count-done, maxLiteralBlocks)
		buf := rc.buf[:n*manifest.BlockSize]
		if err := read(o.Src+done, buf); err != nil {
			return fmt.Errorf("push: reading a stored generation: %w", err)
		}
		if err := rc.copyChecked(o.Start+done, buf, expect[done:done+n]); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// copySource returns the block hashes and the reader of the generation a
// copy frame reads from.
func (rc *receiver) copySource(o *op) ([]manifest.Hash, func(int64, []byte) error, error) {
	if o.Gen == 0 {
		if o.Src+o.Count > o.Start {
			return nil, nil, protoErr("copy of blocks %d+%d from the image itself reaches block %d being written", o.Src, o.Count, o.Start)
		}
		return rc.p.Hashes, rc.p.ReadBlocks, nil
	}
	src := rc.idx[o.Gen]
	if o.Src+o.Count > int64(len(src)) {
		return nil, nil, protoErr("copy of blocks %d+%d from generation %d of %d blocks", o.Src, o.Count, o.Gen, len(src))
	}
	r := rc.readers[o.Gen]
	if r == nil {
		var err error
		if r, err = rc.gens[o.Gen-1].Open(); err != nil {
			return nil, nil, err
		}
		rc.readers[o.Gen] = r
	}
	return src, r.ReadBlocks, nil
}

// copyChecked writes the blocks of buf that have their expected hashes at
// block start onwards, in runs of good non-zero blocks with one call each,
// and marks the others missing.
func (rc *receiver) copyChecked(start int64, buf []byte, expect []manifest.Hash) error {
	p := rc.p
	first := -1
	write := func(end int) error {
		if first < 0 {
			return nil
		}
		err := p.WriteBlocks(start+int64(first), buf[first*manifest.BlockSize:end*manifest.BlockSize])
		first = -1
		if err != nil {
			return fmt.Errorf("push: writing the received image: %w", err)
		}
		return nil
	}
	for i, want := range expect {
		dst := start + int64(i)
		good := manifest.HashBlock(buf[i*manifest.BlockSize:(i+1)*manifest.BlockSize]) == want
		if good {
			p.Hashes[dst] = want
		} else {
			p.Missing[dst] = true
		}
		if !good || want == manifest.ZeroHash() {
			if err := write(i); err != nil {
				return err
			}
			continue
		}
		if first < 0 {
			first = i
		}
	}
	return write(len(expect))
}
