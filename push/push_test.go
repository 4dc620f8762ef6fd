package push

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

type duplex struct {
	io.Reader
	io.Writer
}

// cutWriter fails every write after limit bytes and breaks the pipes, like a
// dropped connection.
type cutWriter struct {
	w     io.Writer
	left  int64
	onCut func()
	once  sync.Once
}

func (c *cutWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > c.left {
		n, _ := c.w.Write(p[:c.left])
		c.left = 0
		c.once.Do(c.onCut)
		return n, io.ErrClosedPipe
	}
	c.left -= int64(len(p))
	return c.w.Write(p)
}

// session runs Serve in a goroutine and returns the sender's end. cut > 0
// breaks the connection after the sender wrote cut bytes.
func pipeSession(t *testing.T, host *store.Store, cut int64) (io.ReadWriter, func() error) {
	t.Helper()
	s2hR, s2hW := io.Pipe()
	h2sR, h2sW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := Serve(context.Background(), duplex{s2hR, h2sW}, host)
		h2sW.Close()
		s2hR.Close()
		done <- err
	}()
	var w io.Writer = s2hW
	if cut > 0 {
		w = &cutWriter{w: s2hW, left: cut, onCut: func() {
			s2hW.CloseWithError(io.ErrClosedPipe)
			h2sR.CloseWithError(io.ErrClosedPipe)
		}}
	}
	wait := func() error {
		s2hW.Close()
		return <-done
	}
	return duplex{h2sR, w}, wait
}

// image returns size bytes: random 4 KiB blocks with every fourth 64 KiB
// stretch zero.
func testImage(seed int64, size int) []byte {
	b := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(b)
	for off := 0; off < size; off += 256 << 10 {
		clear(b[off:min(off+64<<10, size)])
	}
	return b
}

func source(t *testing.T, b []byte) *Source {
	t.Helper()
	s, err := NewSource(bytes.NewReader(b), int64(len(b)), nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func push(t *testing.T, host *store.Store, b []byte, opts Options) *Stats {
	t.Helper()
	conn, wait := pipeSession(t, host, 0)
	if opts.Name == "" {
		opts.Name = "baseline"
	}
	st, err := Push(context.Background(), conn, source(t, b), opts)
	if err != nil {
		t.Fatalf("push: %v", err)
	}
	if err := wait(); err != nil {
		t.Fatalf("serve: %v", err)
	}
	return st
}

// checkCurrent checks that the host's current image is a read-only qcow2
// that reads as want.
func checkCurrent(t *testing.T, host *store.Store, name string, want []byte) string {
	t.Helper()
	cur := filepath.Join(host.Dir, name, "current")
	target, err := filepath.EvalSymlinks(cur)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := qcow2reader.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Type() != "qcow2" {
		t.Errorf("stored image type: got %s, want qcow2", img.Type())
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("host image %s differs from the source", target)
	}
	fi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("generation mode: got %v, want 0444", fi.Mode().Perm())
	}
	return target
}

const imgSize = 8 << 20

func TestPushFirstThenDelta(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	gen1 := testImage(1, imgSize)
	st := push(t, host, gen1, Options{Link: filepath.Join(host.Dir, "links", "baseline.qcow2")})
	t.Logf("first push: sent %d received %d of %d: %+v", st.Sent, st.Received, imgSize, st)
	if st.LiteralBlocks == 0 || st.CopiedBlocks != 0 {
		t.Errorf("first push: got %d literal and %d copied blocks, want literals only", st.LiteralBlocks, st.CopiedBlocks)
	}
	if st.Sent < imgSize*7/10 {
		t.Errorf("first push of random data sent %d bytes, want about %d", st.Sent, imgSize*3/4)
	}
	cur1 := checkCurrent(t, host, "baseline", gen1)
	if l, _ := filepath.EvalSymlinks(filepath.Join(host.Dir, "links", "baseline.qcow2")); l != cur1 {
		t.Errorf("--link points at %q, want %q", l, cur1)
	}

	// Second generation: three blocks changed, one 64 KiB stretch moved.
	gen2 := bytes.Clone(gen1)
	for _, b := range []int{3, 700, 1500} {
		rand.New(rand.NewSource(int64(b))).Read(gen2[b*manifest.BlockSize : (b+1)*manifest.BlockSize])
	}
	copy(gen2[5<<20+4096:], gen1[2<<20:2<<20+64<<10])
	st = push(t, host, gen2, Options{})
	t.Logf("delta push: sent %d received %d: %+v", st.Sent, st.Received, st)
	if st.LiteralBlocks != 3 {
		t.Errorf("delta push: got %d literal blocks, want 3", st.LiteralBlocks)
	}
	if st.Sent > 3*manifest.BlockSize+4096 {
		t.Errorf("delta push sent %d bytes, want at most %d", st.Sent, 4*manifest.BlockSize)
	}
	cur2 := checkCurrent(t, host, "baseline", gen2)
	if cur2 == cur1 {
		t.Fatal("current was not updated")
	}
	if _, err := os.Stat(cur1); err != nil {
		t.Errorf("old generation gone: %v", err)
	}
	if l, _ := filepath.EvalSymlinks(filepath.Join(host.Dir, "links", "baseline.qcow2")); l != cur1 {
		t.Errorf("--link moved without --link: got %q, want %q", l, cur1)
	}
	gens, err := host.List("baseline")
	if err != nil || len(gens) != 2 || !gens[0].Current || gens[0].Path != cur2 {
		t.Fatalf("List: got %+v, %v; want 2 generations, current first", gens, err)
	}
	if _, err := os.Stat(filepath.Join(host.Dir, "baseline", ".partial")); !os.IsNotExist(err) {
		t.Errorf("partial dir left behind: %v", err)
	}

	// Identical re-push: the handshake only.
	st = push(t, host, gen2, Options{})
	if !st.AlreadyCurrent || st.Sent+st.Received > 512 {
		t.Errorf("identical re-push: sent %d received %d, already=%v; want a handshake under 512 bytes", st.Sent, st.Received, st.AlreadyCurrent)
	}
	// Going back to gen1 is a handshake too.
	st = push(t, host, gen1, Options{})
	if !st.AlreadyCurrent || st.Sent > 256 {
		t.Errorf("push of a held generation: sent %d, already=%v", st.Sent, st.AlreadyCurrent)
	}
	checkCurrent(t, host, "baseline", gen1)
}

func TestQemuImgCompare(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	dir := t.TempDir()
	host := &store.Store{Dir: filepath.Join(dir, "store")}
	raw := testImage(7, imgSize+3*512) // not a multiple of 4 KiB
	rawPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.qcow2")
	if out, err := exec.Command(qimg, "convert", "-f", "raw", "-O", "qcow2", "-c", rawPath, src).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	s, err := OpenSource(src, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conn, wait := pipeSession(t, host, 0)
	if _, err := Push(context.Background(), conn, s, Options{Name: "b"}); err != nil {
		t.Fatal(err)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if s.FromManifest {
		t.Error("OpenSource used a manifest that does not exist")
	}
	cur := filepath.Join(host.Dir, "b", "current")
	for _, args := range [][]string{{"check", cur}, {"compare", src, cur}, {"compare", "-f", "raw", rawPath, cur}} {
		if out, err := exec.Command(qimg, args...).CombinedOutput(); err != nil {
			t.Errorf("qemu-img %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
}

func TestResumeAfterCut(t *testing.T) {
	gen1 := testImage(1, imgSize)
	gen2 := bytes.Clone(gen1)
	rand.New(rand.NewSource(9)).Read(gen2[1<<20 : 4<<20]) // 3 MiB new
	full := func() int64 {
		host := &store.Store{Dir: t.TempDir()}
		push(t, host, gen1, Options{})
		return push(t, host, gen2, Options{}).Sent
	}()
	for _, cut := range []int64{10, 100, 200 << 10, 1 << 20, 2 << 20, full - 10} {
		host := &store.Store{Dir: t.TempDir()}
		push(t, host, gen1, Options{})
		cur1 := checkCurrent(t, host, "baseline", gen1)

		conn, wait := pipeSession(t, host, cut)
		st1, err := Push(context.Background(), conn, source(t, gen2), Options{Name: "baseline", CheckpointBytes: 1 << 20})
		if err == nil {
			t.Fatalf("cut at %d: push succeeded", cut)
		}
		wait()
		if got := checkCurrent(t, host, "baseline", gen1); got != cur1 {
			t.Fatalf("cut at %d: current moved to %s", cut, got)
		}
		st2 := push(t, host, gen2, Options{})
		checkCurrent(t, host, "baseline", gen2)
		total := st1.Sent + st2.Sent
		t.Logf("cut at %d: first run sent %d, resumed at block %d sending %d; uncut push sent %d", cut, st1.Sent, st2.ResumedAt, st2.Sent, full)
		if total > full+maxLiteralBlocks*manifest.BlockSize+8<<10 {
			t.Errorf("cut at %d: sent %d in all, want at most one frame more than %d", cut, total, full)
		}
		if cut > 2<<20 && st2.ResumedAt == 0 {
			t.Errorf("cut at %d: resumed at 0", cut)
		}
	}
}

func TestCorruptOldBlockIsResent(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	gen1 := testImage(1, imgSize)
	push(t, host, gen1, Options{})
	cur1 := checkCurrent(t, host, "baseline", gen1)
	// Guest block 16 (64 KiB, the first data after the zero stretch) is the
	// first data cluster of the uncompressed qcow2, right after the header cluster.
	os.Chmod(cur1, 0o644)
	f, err := os.OpenFile(cur1, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("corrupt"), 64<<10+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	gen2 := bytes.Clone(gen1)
	gen2[imgSize-1] ^= 1
	st := push(t, host, gen2, Options{})
	if st.ResentBlocks != 1 {
		t.Errorf("got %d re-sent blocks, want 1", st.ResentBlocks)
	}
	checkCurrent(t, host, "baseline", gen2)
}

func TestLockedName(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	l, err := host.Lock("baseline")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	conn, wait := pipeSession(t, host, 0)
	_, err = Push(context.Background(), conn, source(t, testImage(1, 1<<20)), Options{Name: "baseline"})
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("push to a locked name: got %v, want a remote 'in progress' error", err)
	}
	if err := wait(); !errors.Is(err, store.ErrBusy) {
		t.Fatalf("serve: got %v, want store.ErrBusy", err)
	}
}

func TestConcurrentPushes(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, wait := pipeSession(t, host, 0)
			_, errs[i] = Push(context.Background(), conn, source(t, testImage(int64(i), 4<<20)), Options{Name: "baseline"})
			wait()
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else if !strings.Contains(err.Error(), "in progress") {
			t.Errorf("failed push: got %v, want an 'in progress' error", err)
		}
	}
	if ok == 0 {
		t.Error("neither push succeeded")
	}
}

func TestGarbagePeer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
	}{
		{"empty", ""},
		{"text", "sh: 1: nixvm-image: not found\n"},
		{"magic only", magic},
		{"huge frame", magic + "\x01\xff\xff\xff\xff\x0f"},
		{"wrong first frame", magic + "\x05\x02\x00\x01"},
		{"bad hello", magic + "\x01\x03\x01\x01\x05"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := Serve(context.Background(), duplex{strings.NewReader(tc.input), &out}, &store.Store{Dir: t.TempDir()})
			if err == nil {
				t.Fatal("serve accepted garbage")
			}
			// The sender reading garbage as the host's answer.
			_, err = Push(context.Background(), duplex{strings.NewReader(tc.input), io.Discard}, source(t, testImage(1, 64<<10)), Options{Name: "x"})
			if err == nil {
				t.Fatal("push accepted garbage")
			}
		})
	}
}

func TestVersionMismatch(t *testing.T) {
	var e enc
	// An old (version 1) sender: its hello has no list of cached digests.
	h := &hello{Version: 1, Op: opPush, Name: "x", VirtualSize: 4096}
	var in bytes.Buffer
	fw := newFrameWriter(&in)
	fw.writeMagic()
	fw.frame(frameHello, h.encode(&e))
	fw.flush()
	var out bytes.Buffer
	err := Serve(context.Background(), duplex{&in, &out}, &store.Store{Dir: t.TempDir()})
	if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 1,") || !strings.Contains(err.Error(), fmt.Sprintf("version %d;", Version)) {
		t.Fatalf("serve: got %v, want ErrVersion naming 1 and %d", err, Version)
	}
	// The reply starts with the host's version, which an old sender reads
	// first (and then names both).
	fr := newFrameReader(&out)
	if err := fr.readMagic(); err != nil {
		t.Fatal(err)
	}
	typ, p, err := fr.next()
	if d := (&dec{b: p}); err != nil || typ != frameReply || d.u() != Version {
		t.Fatalf("reply to an old sender: got type %d %x, %v; want a reply of version %d", typ, p, err, Version)
	}
	// A host of another version: the sender names both.
	var hostOut bytes.Buffer
	fw = newFrameWriter(&hostOut)
	fw.writeMagic()
	fw.frame(frameReply, (&reply{Version: 7}).encode(&e))
	fw.flush()
	_, err = Push(context.Background(), duplex{&hostOut, io.Discard}, source(t, testImage(1, 64<<10)), Options{Name: "x"})
	if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 7") {
		t.Fatalf("push: got %v, want ErrVersion naming 7", err)
	}
}

func TestDiskFull(t *testing.T) {
	testutil.NeedRoot(t)
	mount := testutil.NeedTool(t, "mount")[0]
	dir := t.TempDir()
	if out, err := exec.Command(mount, "-t", "tmpfs", "-o", "size=12m", "tmpfs", dir).CombinedOutput(); err != nil {
		testutil.Skip(t, "mount tmpfs: %v: %s", err, out)
	}
	defer exec.Command("umount", dir).Run()
	host := &store.Store{Dir: dir}
	gen1 := testImage(1, 4<<20)
	push(t, host, gen1, Options{})
	cur1 := checkCurrent(t, host, "baseline", gen1)
	conn, wait := pipeSession(t, host, 0)
	_, err := Push(context.Background(), conn, source(t, testImage(2, 16<<20)), Options{Name: "baseline"})
	if err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("push to a full disk: got %v, want 'no space left'", err)
	}
	t.Logf("disk full: %v", err)
	wait()
	if got := checkCurrent(t, host, "baseline", gen1); got != cur1 {
		t.Fatalf("current moved to %s", got)
	}
}

func TestSourceManifest(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	dir := t.TempDir()
	raw := testImage(3, 1<<20)
	rawPath := filepath.Join(dir, "a.raw")
	os.WriteFile(rawPath, raw, 0o644)
	img := filepath.Join(dir, "a.qcow2")
	if out, err := exec.Command(qimg, "convert", "-f", "raw", "-O", "qcow2", "-c", rawPath, img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	want := source(t, raw)
	writeManifest := func(blocks []manifest.Hash) {
		f, err := os.Create(img + ".manifest")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		m := &manifest.Manifest{VirtualSize: int64(len(raw)), Blocks: blocks, Digest: manifest.ComputeDigest(blocks)}
		if _, err := m.WriteTo(f); err != nil {
			t.Fatal(err)
		}
	}
	writeManifest(want.Blocks)
	s, err := OpenSource(img, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !s.FromManifest || s.Digest != want.Digest {
		t.Fatalf("OpenSource with a manifest: FromManifest=%v digest %x, want true and %x", s.FromManifest, s.Digest, want.Digest)
	}
	s.Close()

	// A stale manifest (of other content) is caught by the host's digest check.
	writeManifest(source(t, testImage(4, 1<<20)).Blocks)
	s, err = OpenSource(img, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	host := &store.Store{Dir: filepath.Join(dir, "store")}
	conn, wait := pipeSession(t, host, 0)
	_, err = Push(context.Background(), conn, s, Options{Name: "a"})
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "digest") {
		t.Fatalf("push with a stale manifest: got %v, want a remote digest mismatch", err)
	}
	if err := wait(); !errors.Is(err, store.ErrDigest) {
		t.Fatalf("serve: got %v, want store.ErrDigest", err)
	}
	if _, err := os.Lstat(filepath.Join(host.Dir, "a", "current")); !os.IsNotExist(err) {
		t.Fatalf("current exists after a failed push: %v", err)
	}
}

// TestHelperServe is the host half run as a subprocess by TestResumeAfterHostKilled.
func TestHelperServe(t *testing.T) {
	dir := os.Getenv("NIXVM_PUSH_HELPER_STORE")
	if dir == "" {
		t.Skip("helper process only")
	}
	if err := Serve(context.Background(), duplex{os.Stdin, os.Stdout}, &store.Store{Dir: dir}); err != nil {
		os.Exit(3)
	}
	os.Exit(0)
}

// TestResumeAfterHostKilled kills the host process mid-stream (SIGKILL: no
// chance to save anything then), so the resume point is the last checkpoint
// the sender asked for.
func TestResumeAfterHostKilled(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	gen1 := testImage(1, imgSize)
	push(t, host, gen1, Options{})
	cur1 := checkCurrent(t, host, "baseline", gen1)
	gen2 := bytes.Clone(gen1)
	rand.New(rand.NewSource(9)).Read(gen2[1<<20 : 7<<20]) // 6 MiB new

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperServe$")
	cmd.Env = append(os.Environ(), "NIXVM_PUSH_HELPER_STORE="+host.Dir)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cw := &cutWriter{w: stdin, left: 4 << 20, onCut: func() { cmd.Process.Kill() }}
	_, err := Push(context.Background(), duplex{stdout, cw}, source(t, gen2), Options{Name: "baseline", CheckpointBytes: 1 << 20})
	if err == nil {
		t.Fatal("push to a killed host succeeded")
	}
	cmd.Wait()
	if got := checkCurrent(t, host, "baseline", gen1); got != cur1 {
		t.Fatalf("current moved to %s", got)
	}
	st := push(t, host, gen2, Options{})
	checkCurrent(t, host, "baseline", gen2)
	t.Logf("killed after 4 MiB sent: resumed at block %d, sent %d more", st.ResumedAt, st.Sent)
	// 4 MiB of random literals reach block 256+~1000; checkpoints every 1 MiB of image.
	if st.ResumedAt < 512 || st.ResumedAt > 1300 {
		t.Errorf("resumed at block %d, want a checkpoint between 512 and 1300", st.ResumedAt)
	}
}

// TestSameDigestOtherSize: a push of the digest the host holds with another
// virtual size is refused before anything is received, and the host's
// generation is neither replaced nor made current again (issue 12 item 7).
func TestSameDigestOtherSize(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	data := testImage(1, 1<<20)
	rand.New(rand.NewSource(2)).Read(data[:4096])
	clear(data[len(data)-512:])
	short := data[:len(data)-512]
	push(t, host, data, Options{})
	gen := checkCurrent(t, host, "baseline", data)
	before, err := os.Stat(gen)
	if err != nil {
		t.Fatal(err)
	}
	conn, wait := pipeSession(t, host, 0)
	st, err := Push(context.Background(), conn, source(t, short), Options{Name: "baseline"})
	if !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "another size") {
		t.Errorf("push of the same digest with another size: got %v, want a remote refusal", err)
	}
	if err := wait(); !errors.Is(err, store.ErrConflict) {
		t.Errorf("serve: got %v, want store.ErrConflict", err)
	}
	if st != nil && st.Sent > 4096 {
		t.Errorf("the refused push sent %d bytes, want only the hello", st.Sent)
	}
	after, err := os.Stat(gen)
	if err != nil || !os.SameFile(before, after) {
		t.Errorf("generation %s was replaced", gen)
	}
	checkCurrent(t, host, "baseline", data)
}

// stallWriter passes left bytes on, then blocks every write until release
// is closed: a peer that stops sending but keeps the connection open.
type stallWriter struct {
	w       io.Writer
	left    int64
	release chan struct{}
}

func (s *stallWriter) Write(p []byte) (int, error) {
	if s.left <= 0 {
		<-s.release
		return 0, io.ErrClosedPipe
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	s.left -= int64(len(p))
	return s.w.Write(p)
}

// TestServeIdleTimeout (issue 12 item 6): a peer that stalls mid-push
// (connection open, nothing sent) must not hold the name's lock forever.
// serve gives up after the idle timeout with ErrIdle, releases the lock
// and keeps the checkpoint: the next push resumes past block 0. Before the
// fix serve waited forever (the test's 30 s guard fired).
func TestServeIdleTimeout(t *testing.T) {
	host := &store.Store{Dir: t.TempDir()}
	img := testImage(5, 8<<20)
	s2hR, s2hW := io.Pipe()
	h2sR, h2sW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- ServeIdle(context.Background(), duplex{s2hR, h2sW}, host, 300*time.Millisecond) }()
	sw := &stallWriter{w: s2hW, left: 5 << 20, release: make(chan struct{})}
	pushed := make(chan error, 1)
	go func() {
		_, err := Push(context.Background(), duplex{h2sR, sw}, source(t, img), Options{Name: "baseline"})
		pushed <- err
	}()
	start := time.Now()
	select {
	case err := <-done:
		if !errors.Is(err, ErrIdle) {
			t.Fatalf("serve: got %v, want ErrIdle", err)
		}
		t.Logf("serve gave up %s after the stall began", time.Since(start).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("serve still waiting on a stalled peer after 30 s")
	}
	close(sw.release)
	h2sW.CloseWithError(io.ErrClosedPipe)
	s2hR.CloseWithError(io.ErrClosedPipe)
	if err := <-pushed; err == nil {
		t.Fatal("stalled push succeeded")
	}
	l, err := host.Lock("baseline")
	if err != nil {
		t.Fatalf("lock after serve gave up: %v", err)
	}
	l.Unlock()
	conn, wait := pipeSession(t, host, 0)
	st, err := Push(context.Background(), conn, source(t, img), Options{Name: "baseline"})
	if err != nil {
		t.Fatal(err)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if st.ResumedAt == 0 {
		t.Errorf("second push resumed at block 0: the checkpoint was lost")
	}
	t.Logf("resumed at block %d", st.ResumedAt)
	checkCurrent(t, host, "baseline", img)
}
