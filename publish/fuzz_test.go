package publish

import (
	"bytes"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// The decoders get the fuzzer's bytes with a valid checksum appended, so
// the fuzzer reaches the structure checks instead of stopping at the
// checksum. A decoded object must encode back to an object that decodes
// to the same thing.

func FuzzDecodeIndex(f *testing.F) {
	f.Add(sampleIndex().Encode())
	one := &PackIndex{}
	one.addFrame(4096, hashN(1))
	f.Add(one.Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 32 {
			return
		}
		b = reseal(b)
		p, err := DecodeIndex(b)
		if err != nil {
			return
		}
		var n int64
		for i, fr := range p.Frames {
			if fr.Offset != n || p.First[i] > p.Hashes() || len(fr.Blocks) == 0 || len(fr.Blocks) > MaxFrameBlocks {
				t.Fatalf("frame %d: %+v", i, fr)
			}
			n += fr.Length
		}
		if n != p.PackSize {
			t.Fatalf("frames fill %d of %d", n, p.PackSize)
		}
		q, err := DecodeIndex(p.Encode())
		if err != nil || q.PackSize != p.PackSize || q.Hashes() != p.Hashes() || len(q.Frames) != len(p.Frames) {
			t.Fatalf("re-encoded index: %v", err)
		}
	})
}

func FuzzDecodeRecipe(f *testing.F) {
	saved := maxVirtualSize
	maxVirtualSize = 1 << 26 // bound the block lists the fuzzer makes
	f.Cleanup(func() { maxVirtualSize = saved })
	idx, blocks, d, good := recipeFixture()
	f.Add(good.Encode())
	f.Add((&Recipe{Digest: d, Base: ID{2}, VirtualSize: 6*BlockSize - 100, Ops: []Op{{Kind: opBase, Start: 0, N: 3}, {Kind: opSelf, Start: 1, N: 2}, {Kind: opZero, N: 1}}}).Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 32 {
			return
		}
		b = reseal(b)
		r, err := DecodeRecipe(b)
		if err != nil {
			return
		}
		var n int64
		for _, o := range r.Ops {
			n += o.N
		}
		if n != manifest.BlockCount(r.VirtualSize) {
			t.Fatalf("runs cover %d blocks of %d", n, manifest.BlockCount(r.VirtualSize))
		}
		if !bytes.Equal(r.Encode()[:len(b)-32], b[:len(b)-32]) {
			// Non-canonical uvarints may differ; the meaning must not.
			q, err := DecodeRecipe(r.Encode())
			if err != nil || len(q.Ops) != len(r.Ops) {
				t.Fatalf("re-encoded recipe: %v", err)
			}
		}
		packs := make([]*PackIndex, len(r.Packs))
		for i := range packs {
			packs[i] = idx
		}
		r.Blocks(blocks, packs) // must not panic, whatever the runs say
	})
}

func FuzzParsePointer(f *testing.F) {
	p := &Pointer{Name: "base", Digest: ID{1}, VirtualSize: 4096, Published: time.Unix(1e9, 0), From: []ID{{2}}}
	f.Add(p.Encode(nil))
	f.Add([]byte("nixvm-image latest 1\nname x\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePointer(b)
		if err != nil {
			return
		}
		if ValidName(p.Name) != nil || p.VirtualSize <= 0 {
			t.Fatalf("accepted %+v", p)
		}
		q, err := ParsePointer(p.Encode(nil))
		if err != nil || q.Digest != p.Digest || q.Name != p.Name || len(q.From) != len(p.From) {
			t.Fatalf("re-encoded pointer: %v", err)
		}
	})
}
