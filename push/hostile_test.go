package push

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/store"
)

// TestHostStringsSanitized (issue 12 item 9): names, paths and messages a
// host sends reach the user's terminal without escape sequences or other
// control characters (ESC, the one-byte CSI U+009B, BEL, a bidi override).
// Before the fix List returned them as sent.
func TestHostStringsSanitized(t *testing.T) {
	evil := "ok\x1b]0;pwned\x07\x1b[2J\u009b31m\u202e\r"
	var e enc
	var hostOut bytes.Buffer
	fw := newFrameWriter(&hostOut)
	fw.writeMagic()
	fw.frame(frameReply, (&reply{Version: Version, Gens: []store.Generation{{Name: "n" + evil, VirtualSize: 4096, Path: "/p" + evil}}}).encode(&e))
	fw.flush()
	gens, err := List(context.Background(), duplex{&hostOut, io.Discard}, "")
	if err != nil {
		t.Fatal(err)
	}
	clean := func(what, s string) {
		for _, r := range s {
			if r < 0x20 || r >= 0x7f && r < 0xa0 || r == 0x202e {
				t.Errorf("%s %q holds control character %U", what, s, r)
			}
		}
	}
	clean("name", gens[0].Name)
	clean("path", gens[0].Path)

	hostOut.Reset()
	fw.writeMagic()
	fw.frame(frameError, e.reset().str("bad\n"+evil))
	fw.flush()
	_, err = List(context.Background(), duplex{&hostOut, io.Discard}, "")
	if !errors.Is(err, ErrRemote) {
		t.Fatalf("got %v, want ErrRemote", err)
	}
	clean("error", strings.ReplaceAll(err.Error(), "\n", ""))
}

// floodReader is a host that answers a push with a reply offering an index
// of one small generation, then sends index frames without end.
func floodReader(t *testing.T) io.Reader {
	r, w := io.Pipe()
	go func() {
		var e enc
		fw := newFrameWriter(w)
		fw.writeMagic()
		fw.frame(frameReply, (&reply{Version: Version, Index: 3, Gens: []store.Generation{{Name: "x", VirtualSize: 64 << 10, Digest: [32]byte{1}}}}).encode(&e))
		ents := make([]indexEntry, 16) // the generation's 16 blocks, again and again
		for i := range ents {
			ents[i] = indexEntry{Block: int64(i), Prefix: uint32(i + 1)}
		}
		for {
			fw.frame(frameIndex, encodeIndex(&e, 1, 3, ents))
			if fw.flush() != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { r.Close() })
	return r
}

// TestIndexFloodRefused (issue 12 item 9): a host that sends index frames
// without end is refused once it sends more entries than its generations
// have blocks, instead of the sender reading forever. Before the fix the
// push never returned (the 20 s guard fired).
func TestIndexFloodRefused(t *testing.T) {
	done := make(chan error, 1)
	go func() {
		_, err := Push(context.Background(), duplex{floodReader(t), io.Discard}, source(t, testImage(3, 256<<10)), Options{Name: "x"})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "index") {
			t.Errorf("got %v, want a protocol error about the index", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("push still reading an endless index after 20 s")
	}
}
