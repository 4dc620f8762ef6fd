package publish

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
)

// PullOptions configure Pull.
type PullOptions struct {
	Source Source
	Store  Store
	Name   string
	Link   string
	// Trust, when not empty, requires NAME/latest to be signed by one of
	// these keys.
	Trust []ed25519.PublicKey
	// MaxGap merges frames closer than this into one range request; 0
	// means 256 KiB.
	MaxGap int64
	// MaxRequest bounds the bytes of one range request; 0 means 64 MiB.
	MaxRequest int64
	// Parallel is the number of range requests in flight; 0 means 4.
	Parallel int
	// Retries is how often a failing request is retried; 0 means 6,
	// negative means none.
	Retries int
	// Backoff is the first retry delay, doubled each time; 0 means 250 ms.
	Backoff time.Duration
	// AllowOlder installs a pointer published before the one this host
	// last installed (a rollback); refused by default.
	AllowOlder bool
	// Log, if not nil, receives retry notices.
	Log func(format string, args ...any)
}

// PullStats say what a pull did.
type PullStats struct {
	Digest        ID
	VirtualSize   int64
	AlreadyHeld   bool
	Delta         bool  // the block list came from a delta recipe
	Requests      int64 // every request, retries included
	Bytes         int64 // every body byte received
	RangeRequests int64
	LocalBlocks   int64 // blocks copied from generations the host holds
	Resumed       int64 // blocks already in the partial from a cut pull
	FetchedBlocks int64 // distinct blocks fetched
	Frames        int64
}

type puller struct {
	PullOptions
	src   *Counter
	st    *PullStats
	packs map[ID]*PackIndex
}

// Pull makes NAME/latest of the source the current generation of Name in
// the store, fetching only blocks that no local generation holds.
func Pull(ctx context.Context, o PullOptions) (*PullStats, error) {
	if err := ValidName(o.Name); err != nil {
		return nil, err
	}
	if o.MaxGap == 0 {
		o.MaxGap = 256 << 10
	}
	if o.MaxRequest == 0 {
		o.MaxRequest = 64 << 20
	}
	if o.Parallel <= 0 {
		o.Parallel = 4
	}
	if o.Retries == 0 {
		o.Retries = 6
	}
	if o.Backoff == 0 {
		o.Backoff = 250 * time.Millisecond
	}
	p := &puller{PullOptions: o, src: &Counter{Source: o.Source}, st: &PullStats{}, packs: map[ID]*PackIndex{}}
	err := p.pull(ctx)
	p.st.Requests, p.st.Bytes = p.src.Requests.Load(), p.src.Bytes.Load()
	if err != nil {
		return p.st, fmt.Errorf("pull %s from %s: %w", o.Name, o.Source, err)
	}
	return p.st, nil
}

func (p *puller) logf(format string, args ...any) {
	if p.Log != nil {
		p.Log(format, args...)
	}
}

// retry runs f until it succeeds, fails permanently, or retries run out.
func (p *puller) retry(ctx context.Context, what string, f func() error) error {
	delay := p.Backoff
	for attempt := 0; ; attempt++ {
		err := f()
		if err == nil || permanent(err) || attempt >= p.Retries {
			if err != nil && attempt > 0 {
				err = fmt.Errorf("%w (after %d attempts)", err, attempt+1)
			}
			return err
		}
		p.logf("%s: %v; retrying in %s", what, err, delay)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

func (p *puller) get(ctx context.Context, key string, limit int64) ([]byte, error) {
	var b []byte
	err := p.retry(ctx, key, func() error {
		var err error
		b, err = p.src.Get(ctx, key, limit)
		return err
	})
	return b, err
}

func (p *puller) index(ctx context.Context, id ID) (*PackIndex, error) {
	if idx, ok := p.packs[id]; ok {
		return idx, nil
	}
	var idx *PackIndex
	err := p.retry(ctx, indexKey(id), func() error {
		var err error
		idx, err = fetchIndex(ctx, p.src, id)
		if errors.Is(err, ErrVerify) || errors.Is(err, ErrFormat) {
			return &retryable{err} // a damaged transfer; a damaged object fails again
		}
		return err
	})
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("latest names a generation whose pack index is missing (%w): the store is incomplete; publish again", err)
		}
		return nil, err
	}
	p.packs[id] = idx
	return idx, nil
}

// retryable marks an error worth retrying although permanent() says no.
type retryable struct{ error }

func (r *retryable) Unwrap() error { return r.error }

func (p *puller) pull(ctx context.Context) error {
	ptr, err := p.latest(ctx)
	if err != nil {
		return err
	}
	p.st.Digest, p.st.VirtualSize = ptr.Digest, ptr.VirtualSize
	scratch, err := p.Store.ScratchDir(p.Name)
	if err != nil {
		return err
	}
	stamp := filepath.Join(scratch, publishedStamp)
	if err := p.checkRollback(stamp, ptr); err != nil {
		return err
	}
	installed := func() error { return writeStamp(stamp, ptr.Published) }

	gens, err := p.Store.Generations(p.Name)
	if err != nil {
		return err
	}
	if held, err := p.activateHeld(gens, ptr, installed); held {
		return err
	}
	local, lists, byDigest := p.localBlocks(gens)
	m, err := p.blockList(ctx, ptr, byDigest, lists)
	if err != nil {
		return err
	}
	if m.VirtualSize != ptr.VirtualSize {
		return fmt.Errorf("%w: recipe size %d, latest says %d", ErrFormat, m.VirtualSize, ptr.VirtualSize)
	}

	unlock, err := p.Store.Lock(p.Name)
	if err != nil {
		return err
	}
	defer unlock()
	w, resume, err := openPartial(scratch, ptr.Digest, m.VirtualSize)
	if err != nil {
		return err
	}
	defer w.f.Close()
	if err := p.fill(ctx, ptr, m.Blocks, w, resume, gens, local); err != nil {
		return err
	}
	if err := p.Store.Install(p.Name, m, w.f, p.Link); err != nil {
		return fmt.Errorf("installing the pulled generation (the partial download %s is kept for the next pull): %w", w.path, diskErrOnly(err))
	}
	w.f.Close()
	os.Remove(w.path)
	return installed()
}

// fill fills the partial w with blocks: those a cut pull left (when
// resume), copies from local generations, then fetched ones; and syncs it.
func (p *puller) fill(ctx context.Context, ptr *Pointer, blocks []manifest.Hash, w *partial, resume bool, gens []LocalGeneration, local map[manifest.Hash]localLoc) error {
	var done []bool
	if resume {
		var err error
		if done, err = w.verified(blocks); err != nil {
			return err
		}
	}
	need, copies := p.planBlocks(blocks, local, done)
	if err := p.copyLocal(gens, copies, blocks, w, need); err != nil {
		return err
	}
	if err := p.fetch(ctx, ptr, need, w); err != nil {
		return err
	}
	if err := w.f.Sync(); err != nil {
		return diskErr(w.path, err)
	}
	return nil
}

// checkRollback refuses ptr when it was published before the pointer
// this host last installed (the stamp), unless AllowOlder.
func (p *puller) checkRollback(stamp string, ptr *Pointer) error {
	if last, err := readStamp(stamp); err == nil && ptr.Published.Before(last) && !p.AllowOlder {
		return fmt.Errorf("%w: %s/latest was published %s, before the generation this host last pulled (published %s): refusing a rollback (a replayed old pointer?); pass --allow-older to install it", ErrUntrusted, p.Name, ptr.Published.Format(time.RFC3339), last.Format(time.RFC3339))
	}
	return nil
}

// latest reads and checks NAME/latest: its name and, with Trust, its
// signature.
func (p *puller) latest(ctx context.Context) (*Pointer, error) {
	pb, err := p.get(ctx, latestKey(p.Name), MaxPointerSize)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("nothing published under this name (%w): publish it first: nixvm-image publish IMAGE --name %s --to URL", err, p.Name)
		}
		return nil, err
	}
	ptr, err := ParsePointer(pb)
	if err != nil {
		return nil, err
	}
	if ptr.Name != p.Name {
		return nil, fmt.Errorf("%w: %s/latest names image %q", ErrFormat, p.Name, ptr.Name)
	}
	if err := ptr.Verify(p.Trust); err != nil {
		return nil, err
	}
	return ptr, nil
}

// activateHeld makes the generation ptr names current when the host
// already holds it, then calls installed, and says whether it held it.
func (p *puller) activateHeld(gens []LocalGeneration, ptr *Pointer, installed func() error) (bool, error) {
	for _, g := range gens {
		if ID(g.Digest) != ptr.Digest {
			continue
		}
		p.st.AlreadyHeld = true
		if g.Current && p.Link == "" {
			return true, installed()
		}
		unlock, err := p.Store.Lock(p.Name)
		if err != nil {
			return true, err
		}
		defer unlock()
		if err := p.Store.Activate(p.Name, g.Digest, p.Link); err != nil {
			return true, err
		}
		return true, installed()
	}
	return false, nil
}

// localBlocks reads the local generations' block lists, what the host
// holds: where each non-zero hash is, each generation's list, and the
// generations by digest.
func (p *puller) localBlocks(gens []LocalGeneration) (map[manifest.Hash]localLoc, [][]manifest.Hash, map[ID]int) {
	local := map[manifest.Hash]localLoc{}
	var lists [][]manifest.Hash
	byDigest := map[ID]int{}
	for gi, g := range gens {
		m, err := g.Manifest()
		if err != nil {
			p.logf("ignoring local generation %x: %v", g.Digest[:8], err)
			lists = append(lists, nil)
			continue
		}
		lists = append(lists, m.Blocks)
		byDigest[ID(g.Digest)] = gi
		for j, h := range m.Blocks {
			if _, ok := local[h]; !ok {
				local[h] = localLoc{gi, int64(j)}
			}
		}
	}
	delete(local, manifest.ZeroHash())
	return local, lists, byDigest
}

// openPartial opens the raw file the pull of digest fills, in scratch,
// removing anything else there but the stamp; resume says a cut pull
// left it.
func openPartial(scratch string, digest ID, size int64) (w *partial, resume bool, err error) {
	rawPath := filepath.Join(scratch, digest.String()+".raw")
	if ents, err := os.ReadDir(scratch); err == nil {
		for _, e := range ents {
			if e.Name() != filepath.Base(rawPath) && e.Name() != publishedStamp {
				os.RemoveAll(filepath.Join(scratch, e.Name()))
			}
		}
	}
	_, statErr := os.Stat(rawPath)
	resume = statErr == nil
	raw, err := os.OpenFile(rawPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, false, err
	}
	if err := raw.Truncate(size); err != nil {
		raw.Close()
		return nil, false, diskErr(rawPath, err)
	}
	return &partial{f: raw, path: rawPath, size: size}, resume, nil
}

// planBlocks says where each block still to be filled comes from: runs
// copied from local generations, and need, the hashes to fetch with every
// position they take.
func (p *puller) planBlocks(blocks []manifest.Hash, local map[manifest.Hash]localLoc, done []bool) (map[manifest.Hash][]int64, []copyRun) {
	need := map[manifest.Hash][]int64{}
	zero := manifest.ZeroHash()
	var copies []copyRun
	for i, h := range blocks {
		if h == zero || done != nil && done[i] {
			if h != zero {
				p.st.Resumed++
			}
			continue
		}
		if l, ok := local[h]; ok {
			if n := len(copies) - 1; n >= 0 && copies[n].gen == l.gen && copies[n].at+copies[n].n == int64(i) && copies[n].from+copies[n].n == l.block && copies[n].n < 256 {
				copies[n].n++
			} else {
				copies = append(copies, copyRun{gen: l.gen, from: l.block, at: int64(i), n: 1})
			}
			continue
		}
		need[h] = append(need[h], int64(i))
	}
	return need, copies
}

// publishedStamp, in the scratch directory, holds the publication time of
// the pointer last installed, so a replayed older pointer is refused.
const publishedStamp = "published"

func readStamp(path string) (time.Time, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339, strings.TrimSpace(string(b)))
}

func writeStamp(path string, t time.Time) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(t.UTC().Format(time.RFC3339)+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

type localLoc struct {
	gen   int
	block int64
}

type copyRun struct {
	gen      int
	from, at int64
	n        int64
}

// blockList rebuilds the image's block list from a delta recipe against a
// generation the host holds, else from the full recipe.
func (p *puller) blockList(ctx context.Context, ptr *Pointer, byDigest map[ID]int, lists [][]manifest.Hash) (*manifest.Manifest, error) {
	for _, b := range ptr.From {
		gi, ok := byDigest[b]
		if !ok {
			continue
		}
		m, err := p.recipe(ctx, deltaKey(ptr.Digest, b), ptr.Digest, b, lists[gi])
		if err == nil {
			p.st.Delta = true
			return m, nil
		}
		if errors.Is(err, ErrUntrusted) || ctx.Err() != nil {
			return nil, err
		}
		p.logf("delta recipe from %s: %v; using the full recipe", b, err)
	}
	return p.recipe(ctx, fullKey(ptr.Digest), ptr.Digest, ID{}, nil)
}

func (p *puller) recipe(ctx context.Context, key string, digest, base ID, baseBlocks []manifest.Hash) (*manifest.Manifest, error) {
	b, err := p.get(ctx, key, MaxRecipeSize)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("latest names generation %s, but its recipe is missing (%w): the store is incomplete; publish again", digest, err)
		}
		return nil, err
	}
	r, err := DecodeRecipe(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if r.Digest != digest || r.Base != base {
		return nil, fmt.Errorf("%w: %s describes %s from %s", ErrFormat, key, r.Digest, r.Base)
	}
	packs := make([]*PackIndex, len(r.Packs))
	for _, i := range r.usedPacks() {
		if packs[i], err = p.index(ctx, r.Packs[i]); err != nil {
			return nil, err
		}
	}
	return r.Blocks(baseBlocks, packs)
}

// partial is the image being pulled: a sparse raw file.
type partial struct {
	f    *os.File
	path string
	size int64
	mu   sync.Mutex
}

func (w *partial) writeBlock(i int64, b []byte) error {
	off := i * BlockSize
	if end := off + int64(len(b)); end > w.size {
		b = b[:w.size-off]
	}
	if _, err := w.f.WriteAt(b, off); err != nil {
		return diskErr(w.path, err)
	}
	return nil
}

// verified reads the partial left by a cut pull and says which blocks
// already hold their hash.
func (w *partial) verified(blocks []manifest.Hash) ([]bool, error) {
	done := make([]bool, len(blocks))
	const batch = 256
	buf := make([]byte, batch*BlockSize)
	zero := manifest.ZeroHash()
	for b := int64(0); b < int64(len(blocks)); b += batch {
		n := min(batch, int64(len(blocks))-b)
		chunk := buf[:n*BlockSize]
		clear(chunk)
		end := min(int64(len(chunk)), w.size-b*BlockSize)
		if _, err := w.f.ReadAt(chunk[:end], b*BlockSize); err != nil && err != io.EOF {
			return nil, err
		}
		for i := int64(0); i < n; i++ {
			h := blocks[b+i]
			if h == zero {
				continue
			}
			blk := chunk[i*BlockSize : (i+1)*BlockSize]
			if allZero(blk) {
				continue
			}
			done[b+i] = manifest.HashBlock(blk) == h
		}
	}
	return done, nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// copyLocal copies runs of blocks from local generations, checking each;
// a block that does not match goes to need.
func (p *puller) copyLocal(gens []LocalGeneration, runs []copyRun, blocks []manifest.Hash, w *partial, need map[manifest.Hash][]int64) error {
	readers := map[int]BlockReader{}
	defer func() {
		for _, r := range readers {
			r.Close()
		}
	}()
	buf := make([]byte, 256*BlockSize)
	for _, c := range runs {
		r, ok := readers[c.gen]
		if !ok {
			var err error
			if r, err = gens[c.gen].Open(); err != nil {
				return fmt.Errorf("reading local generation %x: %w", gens[c.gen].Digest[:8], err)
			}
			readers[c.gen] = r
		}
		chunk := buf[:c.n*BlockSize]
		clear(chunk)
		// The last block of a generation may be short; zeros pad it.
		k, err := r.ReadAt(chunk, c.from*BlockSize)
		if k < len(chunk) && err != io.EOF {
			return fmt.Errorf("reading local generation %x: %v", gens[c.gen].Digest[:8], err)
		}
		for j := int64(0); j < c.n; j++ {
			blk := chunk[j*BlockSize : (j+1)*BlockSize]
			h := blocks[c.at+j]
			if manifest.HashBlock(blk) != h {
				need[h] = append(need[h], c.at+j)
				continue
			}
			if err := w.writeBlock(c.at+j, blk); err != nil {
				return err
			}
			p.st.LocalBlocks++
		}
	}
	return nil
}

// wantFrame is a frame to fetch.
type wantFrame struct {
	pack ID
	idx  *PackIndex
	f    int
}

type rangeReq struct {
	pack   ID
	frames []wantFrame
}

func (r rangeReq) start() int64 { return r.frames[0].idx.Frames[r.frames[0].f].Offset }
func (r rangeReq) end() int64 {
	l := r.frames[len(r.frames)-1]
	fr := l.idx.Frames[l.f]
	return fr.Offset + fr.Length
}

// fetch locates every needed block in the loaded pack indexes (loading
// the full recipe's packs when the delta's do not have them all) and
// fetches their frames with coalesced range requests.
func (p *puller) fetch(ctx context.Context, ptr *Pointer, need map[manifest.Hash][]int64, w *partial) error {
	if len(need) == 0 {
		return nil
	}
	frames, err := p.locate(ctx, ptr, need)
	if err != nil {
		return err
	}
	reqs := p.coalesce(frames)
	p.st.Frames = int64(len(frames))
	p.st.FetchedBlocks = int64(len(need))
	if err := p.fetchRanges(ctx, reqs, need, w); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(need) > 0 {
		return fmt.Errorf("%w: %d blocks not delivered", ErrVerify, len(need))
	}
	return nil
}

// locate finds the frames holding the needed blocks, sorted by pack and
// position.
func (p *puller) locate(ctx context.Context, ptr *Pointer, need map[manifest.Hash][]int64) ([]wantFrame, error) {
	type frameKey struct {
		pack ID
		f    int
	}
	located := map[frameKey]wantFrame{}
	find := func() int {
		missing := 0
		for h := range need {
			ok := false
			for id, idx := range p.packs {
				if f := idx.find(h); f >= 0 {
					located[frameKey{id, f}] = wantFrame{id, idx, f}
					ok = true
					break
				}
			}
			if !ok {
				missing++
			}
		}
		return missing
	}
	if find() > 0 {
		// A delta recipe points only at packs holding blocks new since its
		// base; blocks the base should have had (a damaged local copy)
		// are in packs the full recipe names.
		if err := p.loadFullPacks(ctx, ptr); err != nil {
			return nil, err
		}
		if n := find(); n > 0 {
			return nil, fmt.Errorf("%w: %d blocks of %s are in no pack the recipe names", ErrFormat, n, ptr.Digest)
		}
	}
	frames := make([]wantFrame, 0, len(located))
	for _, f := range located {
		frames = append(frames, f)
	}
	sort.Slice(frames, func(i, j int) bool {
		if c := bytes.Compare(frames[i].pack[:], frames[j].pack[:]); c != 0 {
			return c < 0
		}
		return frames[i].f < frames[j].f
	})
	return frames, nil
}

// loadFullPacks loads the indexes of the packs ptr's full recipe uses.
func (p *puller) loadFullPacks(ctx context.Context, ptr *Pointer) error {
	b, err := p.get(ctx, fullKey(ptr.Digest), MaxRecipeSize)
	if err != nil {
		return err
	}
	r, err := DecodeRecipe(b)
	if err != nil {
		return err
	}
	for _, i := range r.usedPacks() {
		if _, err := p.index(ctx, r.Packs[i]); err != nil {
			return err
		}
	}
	return nil
}

// coalesce merges sorted frames of one pack into range requests, closer
// than MaxGap and at most MaxRequest long.
func (p *puller) coalesce(frames []wantFrame) []rangeReq {
	var reqs []rangeReq
	for _, f := range frames {
		fr := f.idx.Frames[f.f]
		if n := len(reqs) - 1; n >= 0 && reqs[n].pack == f.pack && fr.Offset-reqs[n].end() <= p.MaxGap && fr.Offset+fr.Length-reqs[n].start() <= p.MaxRequest {
			reqs[n].frames = append(reqs[n].frames, f)
			continue
		}
		reqs = append(reqs, rangeReq{pack: f.pack, frames: []wantFrame{f}})
	}
	return reqs
}

// fetchRanges runs the range requests, Parallel at a time, and returns
// the first error.
func (p *puller) fetchRanges(ctx context.Context, reqs []rangeReq, need map[manifest.Hash][]int64, w *partial) error {
	var mu sync.Mutex // guards need and the stats
	jobs := make(chan rangeReq)
	errc := make(chan error, p.Parallel)
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for range min(p.Parallel, len(reqs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxFrameBlocks*BlockSize+maxFrameOverhead))
			if err != nil {
				errc <- err
				cancel()
				return
			}
			defer dec.Close()
			for r := range jobs {
				if err := p.fetchRange(fctx, dec, r, need, &mu, w); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, r := range reqs {
		select {
		case jobs <- r:
		case <-fctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// find returns the frame holding h, or -1.
func (idx *PackIndex) find(h manifest.Hash) int {
	if idx.where == nil {
		idx.where = make(map[manifest.Hash]int32, idx.nhash)
		for i, f := range idx.Frames {
			for _, b := range f.Blocks {
				idx.where[b] = int32(i)
			}
		}
	}
	if f, ok := idx.where[h]; ok {
		return int(f)
	}
	return -1
}

// fetchRange fetches one coalesced range, retrying from the first frame
// not yet written after a cut or a bad frame.
func (p *puller) fetchRange(ctx context.Context, dec *zstd.Decoder, r rangeReq, need map[manifest.Hash][]int64, mu *sync.Mutex, w *partial) error {
	next := 0 // frames below next are written
	what := fmt.Sprintf("%s bytes %d-%d", packKey(r.pack), r.start(), r.end()-1)
	return p.retry(ctx, what, func() error {
		first := r.frames[next].idx.Frames[r.frames[next].f]
		off := first.Offset
		mu.Lock()
		p.st.RangeRequests++
		mu.Unlock()
		body, err := p.src.GetRange(ctx, packKey(r.pack), off, r.end()-off)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				return fmt.Errorf("latest names a generation whose pack is missing (%w): the store is incomplete; publish again", err)
			}
			return err
		}
		defer body.Close()
		fr := &frameReader{body: body, pos: off, dec: dec, what: what}
		for ; next < len(r.frames); next++ {
			wf := r.frames[next]
			out, err := fr.next(wf.idx.Frames[wf.f])
			if err != nil {
				return err
			}
			if err := deliver(wf.idx.Frames[wf.f], out, need, mu, w); err != nil {
				return err
			}
		}
		return nil
	})
}

// frameReader reads the frames of one range response in order.
type frameReader struct {
	body     io.Reader
	pos      int64
	dec      *zstd.Decoder
	what     string
	buf, out []byte
}

// next skips to frame fr, reads, decodes and checks it, and returns its
// blocks.
func (r *frameReader) next(fr Frame) ([]byte, error) {
	if _, err := io.CopyN(io.Discard, r.body, fr.Offset-r.pos); err != nil {
		return nil, fmt.Errorf("%s: %w", r.what, noEOF(err))
	}
	if int64(cap(r.buf)) < fr.Length {
		r.buf = make([]byte, fr.Length)
	}
	r.buf = r.buf[:fr.Length]
	if _, err := io.ReadFull(r.body, r.buf); err != nil {
		return nil, fmt.Errorf("%s: %w", r.what, noEOF(err))
	}
	r.pos = fr.Offset + fr.Length
	var err error
	r.out, err = r.dec.DecodeAll(r.buf, r.out[:0])
	if err != nil || len(r.out) != len(fr.Blocks)*BlockSize {
		return nil, &retryable{fmt.Errorf("%w: %s: frame at %d does not decode to its %d blocks (%v)", ErrVerify, r.what, fr.Offset, len(fr.Blocks), err)}
	}
	for j, h := range fr.Blocks {
		blk := r.out[j*BlockSize : (j+1)*BlockSize]
		if manifest.HashBlock(blk) != h {
			return nil, &retryable{fmt.Errorf("%w: %s: block %d of the frame at %d does not match its hash", ErrVerify, r.what, j, fr.Offset)}
		}
	}
	return r.out, nil
}

// deliver writes the decoded blocks of fr still needed to every position
// they take, and takes them off need.
func deliver(fr Frame, out []byte, need map[manifest.Hash][]int64, mu *sync.Mutex, w *partial) error {
	for j, h := range fr.Blocks {
		mu.Lock()
		at, ok := need[h]
		delete(need, h)
		mu.Unlock()
		if !ok {
			continue
		}
		for _, i := range at {
			if err := w.writeBlock(i, out[j*BlockSize:(j+1)*BlockSize]); err != nil {
				return err
			}
		}
	}
	return nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// ErrDiskFull reports that the host's disk filled up.
var ErrDiskFull = errors.New("the host's disk is full")

func diskErr(path string, err error) error {
	if isNoSpace(err) {
		return &permanentErr{fmt.Errorf("%w: writing %s: %v; free space there (or delete the partial download) and pull again; current is unchanged", ErrDiskFull, path, err)}
	}
	return &permanentErr{fmt.Errorf("writing %s: %w", path, err)}
}

func diskErrOnly(err error) error {
	if isNoSpace(err) && !errors.Is(err, ErrDiskFull) {
		return fmt.Errorf("%w: %v; free space and pull again; current is unchanged", ErrDiskFull, err)
	}
	return err
}

func isNoSpace(err error) bool {
	return err != nil && (errors.Is(err, errNoSpace) || strings.Contains(err.Error(), "no space left on device"))
}

// permanentErr stops retries.
type permanentErr struct{ error }

func (p *permanentErr) Unwrap() error { return p.error }
