package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
)

// fuzzSeeds are well-formed sessions: a sender's stream and a host's answer.
func fuzzSeeds() [][]byte {
	var seeds [][]byte
	var e enc
	frames := func(fs ...func(*frameWriter)) []byte {
		var b bytes.Buffer
		fw := newFrameWriter(&b)
		fw.writeMagic()
		for _, f := range fs {
			f(fw)
		}
		fw.flush()
		return b.Bytes()
	}
	h := &hello{Version: Version, Op: opPush, Name: "baseline", VirtualSize: 3 * manifest.BlockSize, Link: "/etc/virt/base-images/baseline.qcow2"}
	seeds = append(seeds, frames(
		func(fw *frameWriter) { fw.frame(frameHello, h.encode(&e)) },
		func(fw *frameWriter) { fw.frame(frameZero, (&op{Type: frameZero, Start: 0, Count: 1}).encode(&e)) },
		func(fw *frameWriter) {
			fw.frame(frameCopy, (&op{Type: frameCopy, Start: 1, Count: 1, Gen: 0, Src: 0}).encode(&e))
		},
		func(fw *frameWriter) { fw.frame(frameCheckpoint, (&op{Type: frameCheckpoint, Start: 2}).encode(&e)) },
		func(fw *frameWriter) { fw.frame(frameEnd, e.reset()) },
	))
	seeds = append(seeds, frames(func(fw *frameWriter) {
		fw.frame(frameHello, (&hello{Version: Version, Op: opList}).encode(&e))
	}))
	// A push hello listing cached generations, then a literal.
	zenc, _ := zstd.NewWriter(nil)
	defer zenc.Close()
	hk := &hello{Version: Version, Op: opPush, Name: "b", VirtualSize: 2 * manifest.BlockSize, Known: [][32]byte{{1, 2, 3}, {4}}}
	seeds = append(seeds, frames(
		func(fw *frameWriter) { fw.frame(frameHello, hk.encode(&e)) },
		func(fw *frameWriter) {
			fw.frame(frameLiteral, (&op{Type: frameLiteral, Start: 0, Count: 2, Data: zenc.EncodeAll(make([]byte, 2*manifest.BlockSize), nil)}).encode(&e))
		},
		func(fw *frameWriter) { fw.frame(frameEnd, e.reset()) },
	))
	seeds = append(seeds, frames(
		func(fw *frameWriter) {
			fw.frame(frameReply, (&reply{Version: Version, Gens: []store.Generation{{Name: "b", VirtualSize: 4096, Current: true, Path: "/x"}}, Resume: 1, Index: 3}).encode(&e))
		},
		func(fw *frameWriter) {
			fw.frame(frameIndex, encodeIndex(&e, 1, 3, []indexEntry{{0, 1}, {5, 2}, {6, 0xdeadbeef}, {7, 4}, {100, 5}}))
		},
		func(fw *frameWriter) { fw.frame(frameIndexEnd, e.reset()) },
		func(fw *frameWriter) { fw.frame(frameResult, (&result{Missing: []run{{1, 2}}}).encode(&e)) },
		func(fw *frameWriter) { fw.frame(frameError, e.reset().str("disk full")) },
	))
	seeds = append(seeds, []byte(magic+"\x07\x05\x00\x01\x28\xb5\x2f\xfd"), []byte("garbage"))
	return seeds
}

// FuzzDecode feeds arbitrary bytes to every decoder, as frames and as raw
// payloads, and to a host session: nothing may panic, and what decodes
// re-encodes to the same message.
func FuzzDecode(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		decodeAll(t, data)
		fr := newFrameReader(bytes.NewReader(data))
		if fr.readMagic() == nil {
			for {
				typ, p, err := fr.next()
				if err != nil {
					break
				}
				decodeAll(t, append([]byte{typ}, p...))
			}
		}
		// A host session reading the bytes; the host is in a temp dir.
		if bytes.HasPrefix(data, []byte(magic)) {
			err := Serve(context.Background(), duplex{bytes.NewReader(data), io.Discard}, &store.Store{Dir: t.TempDir()})
			if err == nil {
				return
			}
			if !errors.Is(err, ErrProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) &&
				!errors.Is(err, ErrVersion) && !errors.Is(err, store.ErrName) && !errors.Is(err, ErrRemote) && !errors.Is(err, store.ErrDigest) && !errors.Is(err, store.ErrSize) {
				t.Logf("serve: %v", err) // e.g. a link path the test cannot create: fine, but say so
			}
		}
	})
}

// decodeAll runs every payload decoder on p[1:], choosing limits from p[0].
func decodeAll(t *testing.T, p []byte) {
	if len(p) == 0 {
		return
	}
	body := p[1:]
	if h, err := decodeHello(body); err == nil {
		var e enc
		h2, err := decodeHello(h.encode(&e).b)
		if err != nil || !reflect.DeepEqual(h2, h) {
			t.Fatalf("hello round trip: %+v -> %+v, %v", h, h2, err)
		}
	}
	if r, err := decodeReply(body); err == nil {
		var e enc
		if _, err := decodeReply(r.encode(&e).b); err != nil {
			t.Fatalf("reply round trip: %v", err)
		}
	}
	decodeIndex(body, int(p[0]), 2+int(p[0])%3, nil)
	for typ := byte(frameZero); typ <= frameEnd; typ++ {
		if o, err := decodeOp(typ, body, int64(p[0])*1000, int(p[0]%4)); err == nil {
			if o.Type != frameEnd && o.Start+o.Count > int64(p[0])*1000 {
				t.Fatalf("op %+v beyond %d blocks", o, int64(p[0])*1000)
			}
		}
	}
	decodeResult(body, int64(p[0]))
	decodeError(body)
}

// TestWriteFuzzSeeds regenerates testdata/fuzz/FuzzDecode with
// NIXVM_WRITE_FUZZ_SEEDS=1.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("NIXVM_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set NIXVM_WRITE_FUZZ_SEEDS=1 to rewrite the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	os.MkdirAll(dir, 0o755)
	for i, s := range fuzzSeeds() {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s)))
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%d", i)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
