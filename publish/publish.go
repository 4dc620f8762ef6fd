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
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/zeebo/blake3"
)

// Image is a generation to publish: its guest-visible content and block
// hashes (push.OpenSource gives both).
type Image struct {
	R           io.ReaderAt
	VirtualSize int64
	Blocks      []manifest.Hash
	Digest      [32]byte
}

// PublishOptions configure Publish.
type PublishOptions struct {
	Target Target
	Name   string
	// Level is the zstd level (1 to 22 as the zstd tool counts); 0 means 3.
	Level int
	// FrameBlocks is the most blocks per frame; 0 means DefaultFrameBlocks.
	FrameBlocks int
	// SignKey signs NAME/latest when not nil.
	SignKey ed25519.PrivateKey
	// Deltas is how many earlier generations get a delta recipe; 0 means 4.
	Deltas int
	// Now is the publication time; nil means time.Now.
	Now func() time.Time
	// IndexCache, if not empty, is a directory keeping the pack indexes
	// read from the target (immutable, checked by their hash), so a
	// publish reads only the indexes published since the last one.
	IndexCache string
}

// DefaultFrameBlocks is the frame size publish uses by default: 16 blocks,
// 64 KiB (measured in BENCHMARKS.md against 1, 4 and 64).
const DefaultFrameBlocks = 16

// PublishStats say what a publish wrote.
type PublishStats struct {
	Digest        ID
	Blocks        int64 // non-zero blocks of the image
	NewBlocks     int64 // blocks no earlier pack held
	Frames        int64
	PackBytes     int64 // compressed size of the new pack
	IndexBytes    int64
	RecipeBytes   int64
	Objects       int   // objects written
	UploadedBytes int64 // everything written
	Deltas        int   // delta recipes written
	PublishedPack ID    // zero if no new pack
}

// published is what a target holds: every pack index, and where each
// block hash lives.
type published struct {
	ids   []ID
	packs []*PackIndex
	byID  map[ID]int
	loc   map[manifest.Hash]blockLoc
}

type blockLoc struct {
	pack int
	k    int64
}

func (p *published) add(id ID, idx *PackIndex) {
	pi := len(p.packs)
	p.ids = append(p.ids, id)
	p.packs = append(p.packs, idx)
	p.byID[id] = pi
	var k int64
	for _, f := range idx.Frames {
		for _, h := range f.Blocks {
			if _, ok := p.loc[h]; !ok {
				p.loc[h] = blockLoc{pi, k}
			}
			k++
		}
	}
}

func loadPublished(ctx context.Context, t Target, cache string) (*published, error) {
	keys, err := t.List(ctx, "packs/")
	if err != nil {
		return nil, fmt.Errorf("publish: listing %s/packs: %w", t, err)
	}
	p := &published{byID: map[ID]int{}, loc: map[manifest.Hash]blockLoc{}}
	for _, k := range keys {
		hexid, ok := strings.CutSuffix(strings.TrimPrefix(k, "packs/"), ".idx")
		if !ok {
			continue
		}
		id, err := ParseID(hexid)
		if err != nil {
			return nil, fmt.Errorf("publish: %s/%s: %w", t, k, err)
		}
		idx, err := cachedIndex(ctx, t, id, cache)
		if err != nil {
			return nil, err
		}
		p.add(id, idx)
	}
	return p, nil
}

// cachedIndex reads a pack index from the cache directory when it holds
// bytes with the right hash, else from the source, keeping a copy.
func cachedIndex(ctx context.Context, s Source, id ID, cache string) (*PackIndex, error) {
	if cache == "" {
		return fetchIndex(ctx, s, id)
	}
	path := filepath.Join(cache, id.String()+".idx")
	if b, err := os.ReadFile(path); err == nil && sum(b) == id {
		if idx, err := DecodeIndex(b); err == nil {
			return idx, nil
		}
	}
	b, idx, err := getIndex(ctx, s, id)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cache, 0o755); err == nil {
		tmp := path + ".tmp"
		if os.WriteFile(tmp, b, 0o644) == nil {
			os.Rename(tmp, path)
		}
	}
	return idx, nil
}

func indexKey(id ID) string { return "packs/" + id.String() + ".idx" }
func packKey(id ID) string  { return "packs/" + id.String() + ".pack" }
func fullKey(d ID) string   { return "recipes/" + d.String() + ".full" }
func deltaKey(d, base ID) string {
	return "recipes/" + d.String() + ".from-" + base.String()
}
func latestKey(name string) string { return name + "/latest" }

// fetchIndex gets and checks a pack index: its bytes must hash to its name.
func fetchIndex(ctx context.Context, s Source, id ID) (*PackIndex, error) {
	_, idx, err := getIndex(ctx, s, id)
	return idx, err
}

func getIndex(ctx context.Context, s Source, id ID) ([]byte, *PackIndex, error) {
	b, err := s.Get(ctx, indexKey(id), MaxIndexSize)
	if err != nil {
		return nil, nil, fmt.Errorf("publish: pack index %s: %w", id, err)
	}
	if got := sum(b); got != id {
		return nil, nil, fmt.Errorf("%w: %s/%s: content hashes to %s", ErrVerify, s, indexKey(id), got)
	}
	idx, err := DecodeIndex(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%s/%s: %w", s, indexKey(id), err)
	}
	return b, idx, nil
}

// Publish writes img as the newest generation of o.Name: a pack with the
// blocks no earlier pack holds, its index, the recipes, and NAME/latest
// last.
func Publish(ctx context.Context, img *Image, o PublishOptions) (*PublishStats, error) {
	if err := o.check(img); err != nil {
		return nil, err
	}
	pub, err := loadPublished(ctx, o.Target, o.IndexCache)
	if err != nil {
		return nil, err
	}
	p := &publisher{ctx: ctx, t: o.Target, img: img, o: &o, pub: pub, st: &PublishStats{Digest: ID(img.Digest)}}
	frames := p.planFrames()
	if len(frames) > 0 {
		if err := p.writePack(frames); err != nil {
			return nil, err
		}
	}
	full := encodeRecipe(img, pub, nil, ID{})
	fb := full.Encode()
	p.st.RecipeBytes += int64(len(fb))
	if err := p.put(fullKey(ID(img.Digest)), fb); err != nil {
		return nil, err
	}
	ptr, err := p.writeDeltas()
	if err != nil {
		return nil, err
	}
	if err := p.put(latestKey(o.Name), ptr.Encode(o.SignKey)); err != nil {
		return nil, err
	}
	return p.st, nil
}

// check validates the name and the image and fills in the defaults.
func (o *PublishOptions) check(img *Image) error {
	if err := ValidName(o.Name); err != nil {
		return err
	}
	m := &manifest.Manifest{VirtualSize: img.VirtualSize, Blocks: img.Blocks, Digest: img.Digest}
	if err := m.Validate(); err != nil {
		return err
	}
	if o.FrameBlocks <= 0 {
		o.FrameBlocks = DefaultFrameBlocks
	}
	if o.FrameBlocks > MaxFrameBlocks {
		return fmt.Errorf("publish: %d blocks per frame, at most %d", o.FrameBlocks, MaxFrameBlocks)
	}
	if o.Level == 0 {
		o.Level = 3
	}
	if o.Deltas <= 0 {
		o.Deltas = 4
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return nil
}

// publisher is one Publish call: what it writes to and what it has
// written so far.
type publisher struct {
	ctx context.Context
	t   Target
	img *Image
	o   *PublishOptions
	pub *published
	st  *PublishStats
}

// frame is a run of consecutive new blocks compressed together.
type frame struct{ start, n int64 }

func (p *publisher) put(key string, b []byte) error {
	if err := p.t.Put(p.ctx, key, bytes.NewReader(b), int64(len(b))); err != nil {
		return fmt.Errorf("publish: writing %s/%s: %w", p.t, key, err)
	}
	p.st.Objects++
	p.st.UploadedBytes += int64(len(b))
	return nil
}

// planFrames picks the new blocks, in image order, cut into frames of
// consecutive blocks.
func (p *publisher) planFrames() []frame {
	zero := manifest.ZeroHash()
	var frames []frame
	fresh := map[manifest.Hash]bool{}
	for i, h := range p.img.Blocks {
		if h == zero {
			continue
		}
		p.st.Blocks++
		if _, ok := p.pub.loc[h]; ok || fresh[h] {
			continue
		}
		fresh[h] = true
		p.st.NewBlocks++
		if l := len(frames) - 1; l >= 0 && frames[l].start+frames[l].n == int64(i) && frames[l].n < int64(p.o.FrameBlocks) {
			frames[l].n++
		} else {
			frames = append(frames, frame{int64(i), 1})
		}
	}
	p.st.Frames = int64(len(frames))
	return frames
}

// writePack compresses the frames into a temporary pack, then writes the
// pack and its index to the target.
func (p *publisher) writePack(frames []frame) error {
	tmp, err := os.CreateTemp("", "nixvm-pack-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	idx, err := p.compressFrames(frames, tmp)
	if err != nil {
		return err
	}
	ib := idx.Encode()
	id := sum(ib)
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	// The pack first, then its index: a reader never sees an index
	// whose pack is not there.
	if err := p.t.Put(p.ctx, packKey(id), tmp, idx.PackSize); err != nil {
		return fmt.Errorf("publish: writing %s/%s: %w", p.t, packKey(id), err)
	}
	p.st.Objects++
	p.st.UploadedBytes += idx.PackSize
	if err := p.put(indexKey(id), ib); err != nil {
		return err
	}
	p.st.PackBytes, p.st.IndexBytes, p.st.PublishedPack = idx.PackSize, int64(len(ib)), id
	p.pub.add(id, idx)
	return nil
}

type frameResult struct {
	data []byte
	err  error
}

// compressFrames compresses the frames on every core and writes them to
// tmp in order, returning the pack's index.
func (p *publisher) compressFrames(frames []frame, tmp *os.File) (*PackIndex, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(p.o.Level)), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	results := make([]chan frameResult, len(frames))
	for i := range results {
		results[i] = make(chan frameResult, 1)
	}
	sem := make(chan struct{}, runtime.GOMAXPROCS(0)*2)
	var wg sync.WaitGroup
	wctx, cancel := context.WithCancel(p.ctx)
	defer cancel()
	go func() {
		for i, f := range frames {
			select {
			case sem <- struct{}{}:
			case <-wctx.Done():
				results[i] <- frameResult{err: wctx.Err()}
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i] <- p.compressFrame(enc, f)
			}()
		}
	}()
	idx := &PackIndex{}
	hasher := blake3.New()
	for i, f := range frames {
		r := <-results[i]
		<-sem
		if r.err != nil {
			cancel()
			return nil, r.err
		}
		if _, err := tmp.Write(r.data); err != nil {
			cancel()
			return nil, fmt.Errorf("publish: writing the pack to %s: %w", tmp.Name(), err)
		}
		hasher.Write(r.data)
		idx.addFrame(int64(len(r.data)), p.img.Blocks[f.start:f.start+f.n])
	}
	wg.Wait()
	hasher.Sum(idx.PackSum[:0])
	return idx, nil
}

// compressFrame reads one frame, checks its blocks against the manifest
// and compresses it.
func (p *publisher) compressFrame(enc *zstd.Encoder, f frame) frameResult {
	img := p.img
	raw := make([]byte, f.n*BlockSize)
	end := min(int64(len(raw)), img.VirtualSize-f.start*BlockSize)
	if k, err := img.R.ReadAt(raw[:end], f.start*BlockSize); int64(k) < end {
		return frameResult{err: fmt.Errorf("publish: reading the image at %d: %v", f.start*BlockSize, err)}
	}
	for j := int64(0); j < f.n; j++ {
		if got := manifest.HashBlock(raw[j*BlockSize : (j+1)*BlockSize]); got != img.Blocks[f.start+j] {
			return frameResult{err: fmt.Errorf("%w: block %d of the image does not match its manifest (changed while publishing?)", ErrVerify, f.start+j)}
		}
	}
	return frameResult{data: enc.EncodeAll(raw, nil)}
}

// writeDeltas writes delta recipes from the generation latest names now
// and the ones it had deltas from, newest first, and returns the new
// pointer naming them.
func (p *publisher) writeDeltas() (*Pointer, error) {
	img, o := p.img, p.o
	ptr := &Pointer{Name: o.Name, Digest: ID(img.Digest), VirtualSize: img.VirtualSize, Published: o.Now().UTC().Truncate(time.Second)}
	prev, err := getPointer(p.ctx, p.t, o.Name)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	if prev == nil {
		return ptr, nil
	}
	bases := append([]ID{prev.Digest}, prev.From...)
	for _, b := range bases {
		if len(ptr.From) == o.Deltas {
			break
		}
		if b == ID(img.Digest) || contains(ptr.From, b) {
			continue
		}
		bm, err := rebuildFull(p.ctx, p.t, p.pub, b)
		if err != nil {
			return nil, fmt.Errorf("publish: the earlier generation %s: %w", b, err)
		}
		db := encodeRecipe(img, p.pub, bm.Blocks, b).Encode()
		if err := p.put(deltaKey(ID(img.Digest), b), db); err != nil {
			return nil, err
		}
		p.st.RecipeBytes += int64(len(db))
		p.st.Deltas++
		ptr.From = append(ptr.From, b)
	}
	return ptr, nil
}

func contains(ids []ID, id ID) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

func getPointer(ctx context.Context, s Source, name string) (*Pointer, error) {
	b, err := s.Get(ctx, latestKey(name), MaxPointerSize)
	if err != nil {
		return nil, fmt.Errorf("publish: %s/%s: %w", s, latestKey(name), err)
	}
	p, err := ParsePointer(b)
	if err != nil {
		return nil, fmt.Errorf("%s/%s: %w", s, latestKey(name), err)
	}
	if p.Name != name {
		return nil, fmt.Errorf("%w: %s/%s names image %q", ErrFormat, s, latestKey(name), p.Name)
	}
	return p, nil
}

// rebuildFull reads the full recipe of d and expands it with the packs
// already loaded.
func rebuildFull(ctx context.Context, s Source, pub *published, d ID) (*manifest.Manifest, error) {
	b, err := s.Get(ctx, fullKey(d), MaxRecipeSize)
	if err != nil {
		return nil, err
	}
	r, err := DecodeRecipe(b)
	if err != nil {
		return nil, err
	}
	if r.Digest != d || r.Base != (ID{}) {
		return nil, fmt.Errorf("%w: %s/%s describes %s from %s", ErrFormat, s, fullKey(d), r.Digest, r.Base)
	}
	packs := make([]*PackIndex, len(r.Packs))
	for i, id := range r.Packs {
		pi, ok := pub.byID[id]
		if !ok {
			return nil, fmt.Errorf("%w: %s/%s uses pack %s, which is not published", ErrNotFound, s, fullKey(d), id)
		}
		packs[i] = pub.packs[pi]
	}
	return r.Blocks(nil, packs)
}

// encodeRecipe describes img's blocks: zero runs, runs of base (when not
// nil: at the same position, else anywhere in base) and runs of packs.
func encodeRecipe(img *Image, pub *published, base []manifest.Hash, baseID ID) *Recipe {
	r := &Recipe{Digest: ID(img.Digest), Base: baseID, VirtualSize: img.VirtualSize}
	var inBase map[manifest.Hash]int64
	if base != nil {
		inBase = make(map[manifest.Hash]int64, len(base))
		for j := len(base) - 1; j >= 0; j-- {
			inBase[base[j]] = int64(j)
		}
	}
	packSlot := map[int]int{}
	zero := manifest.ZeroHash()
	push := func(o Op) {
		if l := len(r.Ops) - 1; l >= 0 {
			p := &r.Ops[l]
			if p.Kind == o.Kind && p.Pack == o.Pack && (o.Kind == opZero || p.Start+p.N == o.Start) {
				p.N++
				return
			}
		}
		r.Ops = append(r.Ops, o)
	}
	for i, h := range img.Blocks {
		switch {
		case h == zero:
			push(Op{Kind: opZero, N: 1})
		case base != nil && i < len(base) && base[i] == h:
			push(Op{Kind: opBase, Start: int64(i), N: 1})
		case base != nil && hasKey(inBase, h) && !continuesPack(r, pub, packSlot, h):
			push(Op{Kind: opBase, Start: inBase[h], N: 1})
		default:
			loc := pub.loc[h]
			slot, ok := packSlot[loc.pack]
			if !ok {
				slot = len(r.Packs)
				packSlot[loc.pack] = slot
				r.Packs = append(r.Packs, pub.ids[loc.pack])
			}
			push(Op{Kind: opPack, Pack: slot, Start: loc.k, N: 1})
		}
	}
	return r
}

func hasKey(m map[manifest.Hash]int64, h manifest.Hash) bool { _, ok := m[h]; return ok }

// continuesPack says whether h extends the recipe's last pack run (cheaper
// than starting a base run elsewhere).
func continuesPack(r *Recipe, pub *published, slots map[int]int, h manifest.Hash) bool {
	l := len(r.Ops) - 1
	if l < 0 || r.Ops[l].Kind != opPack {
		return false
	}
	loc := pub.loc[h]
	slot, ok := slots[loc.pack]
	return ok && slot == r.Ops[l].Pack && r.Ops[l].Start+r.Ops[l].N == loc.k
}
