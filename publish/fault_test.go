package publish

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// faultProxy sits between the puller and nginx and breaks pack range
// requests as a bad network or server does.
type faultProxy struct {
	upstream string
	mode     string // drop, 503, 416, short, corrupt
	times    int64  // how many pack requests to break; -1: all
	broken   atomic.Int64
	passed   atomic.Int64
	url      string
}

func startFaultProxy(t *testing.T, upstream, mode string, times int64) *faultProxy {
	t.Helper()
	fp := &faultProxy{upstream: upstream, mode: mode, times: times}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: fp}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	fp.url = "http://" + l.Addr().String()
	return fp
}

func (fp *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req, _ := http.NewRequest(r.Method, fp.upstream+r.URL.Path, nil)
	if rg := r.Header.Get("Range"); rg != "" {
		req.Header.Set("Range", rg)
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		http.Error(w, err.Error(), 502)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	isPack := strings.HasSuffix(r.URL.Path, ".pack")
	if !isPack || fp.times >= 0 && fp.broken.Load() >= fp.times {
		fp.passed.Add(1)
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		w.Write(body)
		return
	}
	fp.broken.Add(1)
	switch fp.mode {
	case "503":
		http.Error(w, "upstream overloaded", 503)
	case "416":
		w.WriteHeader(416)
	case "drop", "short":
		// Headers promise the whole range; half the body arrives, then the
		// connection closes (drop) or the response ends (short, with a
		// Content-Length that admits it).
		hj := w.(http.Hijacker)
		conn, bw, _ := hj.Hijack()
		defer conn.Close()
		n := len(body)
		if fp.mode == "short" {
			n = len(body) / 2
		}
		fmt.Fprintf(bw, "HTTP/1.1 206 Partial Content\r\nContent-Range: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", resp.Header.Get("Content-Range"), n)
		bw.Write(body[:len(body)/2])
		bw.Flush()
	case "corrupt":
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		if len(body) > 100 {
			body[len(body)/2] ^= 0x55
		}
		w.Write(body)
	}
}

// faultEnv: gen1 and its rebuild gen2 published to pub, served by nginx;
// pub1 holds gen1 only, to give hosts gen1.
type faultEnv struct {
	pub, pub1 string
	srv       *nginx
	g1, g2    []byte
}

func newFaultEnv(t *testing.T) *faultEnv {
	e := &faultEnv{pub: t.TempDir(), pub1: t.TempDir()}
	e.srv = startNginx(t, e.pub)
	e.g1 = testImage(11, 8<<20)
	e.g2 = rebuild(e.g1, 12, 512<<10)
	publishT(t, e.pub1, "img", e.g1, PublishOptions{})
	publishT(t, e.pub, "img", e.g1, PublishOptions{})
	publishT(t, e.pub, "img", e.g2, PublishOptions{FrameBlocks: 4})
	return e
}

// host is a new host store holding gen1 as current.
func (e *faultEnv) host(t *testing.T) string {
	h := t.TempDir()
	if _, err := pullT(t, "file://"+e.pub1, h, "img", PullOptions{}); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestPullRetries: transient faults are retried with backoff and the pull
// completes, verified.
func TestPullRetries(t *testing.T) {
	e := newFaultEnv(t)
	for _, mode := range []string{"drop", "503", "short", "corrupt"} {
		t.Run(mode, func(t *testing.T) {
			host := e.host(t)
			fp := startFaultProxy(t, e.srv.URL, mode, 2)
			st, err := pullT(t, fp.url, host, "img", PullOptions{Parallel: 1, MaxGap: 1})
			if err != nil {
				t.Fatal(err)
			}
			if fp.broken.Load() != 2 {
				t.Fatalf("the proxy broke %d requests, want 2", fp.broken.Load())
			}
			t.Logf("%s: %+v", mode, *st)
			checkCurrent(t, host, "img", e.g2)
		})
	}
}

// TestPullFailsCleanly: permanent faults fail with a clear message and
// leave current and every generation as they were.
func TestPullFailsCleanly(t *testing.T) {
	e := newFaultEnv(t)
	pub, srv := e.pub, e.srv
	cases := []struct {
		mode, want string
		prep       func(t *testing.T) (url string, undo func())
	}{
		{"416", "416 Range Not Satisfiable", func(t *testing.T) (string, func()) {
			return startFaultProxy(t, srv.URL, "416", -1).url, func() {}
		}},
		{"corrupt always", "does not", func(t *testing.T) (string, func()) {
			return startFaultProxy(t, srv.URL, "corrupt", -1).url, func() {}
		}},
		{"503 always", "503", func(t *testing.T) (string, func()) {
			return startFaultProxy(t, srv.URL, "503", -1).url, func() {}
		}},
		{"pack missing", "pack is missing", func(t *testing.T) (string, func()) {
			packs, _ := filepath.Glob(filepath.Join(pub, "packs", "*.pack"))
			var moved []string
			for _, p := range packs {
				os.Rename(p, p+".away")
				moved = append(moved, p)
			}
			return srv.URL, func() {
				for _, p := range moved {
					os.Rename(p+".away", p)
				}
			}
		}},
		{"index missing", "pack index is missing", func(t *testing.T) (string, func()) {
			idx, _ := filepath.Glob(filepath.Join(pub, "packs", "*.idx"))
			for _, p := range idx {
				os.Rename(p, p+".away")
			}
			return srv.URL, func() {
				for _, p := range idx {
					os.Rename(p+".away", p)
				}
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.mode, func(t *testing.T) {
			host := e.host(t)
			before := storeState(t, host)
			url, undo := c.prep(t)
			defer undo()
			_, err := pullT(t, url, host, "img", PullOptions{Retries: 2})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error saying %q", err, c.want)
			}
			t.Logf("%s: %v", c.mode, err)
			if after := storeState(t, host); after != before {
				t.Fatalf("the store changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// TestPullResumes: a pull cut off mid-range (no retries) keeps what it
// verified; the next pull fetches only the rest.
func TestPullResumes(t *testing.T) {
	pub := t.TempDir()
	srv := startNginx(t, pub)
	g1 := testImage(21, 8<<20)
	publishT(t, pub, "img", g1, PublishOptions{})
	host := t.TempDir()
	fp := startFaultProxy(t, srv.URL, "drop", 1)
	_, err := pullT(t, fp.url, host, "img", PullOptions{Retries: -1, Parallel: 1})
	if err == nil {
		t.Fatal("a cut pull succeeded")
	}
	t.Logf("cut: %v", err)
	if _, err := (&pushStoreT{host}).current(); err == nil {
		t.Fatal("a cut pull installed a generation")
	}
	st, err := pullT(t, srv.URL, host, "img", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed: %+v", *st)
	if st.Resumed == 0 || st.FetchedBlocks+st.Resumed != int64(len(imageOf(g1).Blocks))-countZero(imageOf(g1)) {
		t.Fatalf("resume: %d blocks kept, %d fetched", st.Resumed, st.FetchedBlocks)
	}
	checkCurrent(t, host, "img", g1)
	if raws, _ := filepath.Glob(filepath.Join(host, "img", ".pull", "*.raw")); len(raws) != 0 {
		t.Fatalf("partial left behind: %v", raws)
	}
}

// TestPullDiskFull: a store on a tmpfs too small for the image fails with
// a clear message; current is untouched.
func TestPullDiskFull(t *testing.T) {
	testutil.NeedRoot(t)
	pub := t.TempDir()
	srv := startNginx(t, pub)
	g1 := testImage(31, 4<<20)
	g2 := testImage(32, 16<<20)
	host := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", host).CombinedOutput(); err != nil {
		testutil.Skip(t, "mount tmpfs: %v: %s", err, out)
	}
	defer exec.Command("umount", host).Run()
	publishT(t, pub, "img", g1, PublishOptions{})
	if _, err := pullT(t, srv.URL, host, "img", PullOptions{}); err != nil {
		t.Fatal(err)
	}
	publishT(t, pub, "img", g2, PublishOptions{})
	before := storeState(t, host)
	_, err := pullT(t, srv.URL, host, "img", PullOptions{})
	if !errors.Is(err, ErrDiskFull) {
		t.Fatalf("got %v, want ErrDiskFull", err)
	}
	t.Logf("disk full: %v", err)
	if after := storeState(t, host); after != before {
		t.Fatalf("the store changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	checkCurrent(t, host, "img", g1)
}

// TestPullConcurrentHosts: 8 host stores, each pulled by its own process,
// fetch the same new generation from one nginx at once.
func TestPullConcurrentHosts(t *testing.T) {
	testutil.Short(t)
	pub := t.TempDir()
	srv := startNginx(t, pub)
	g1 := testImage(41, 16<<20)
	g2 := rebuild(g1, 42, 1<<20)
	publishT(t, pub, "img", g1, PublishOptions{})
	bin := filepath.Join(t.TempDir(), "nixvm-image")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/nixvm-image").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	hosts := make([]string, 8)
	for i := range hosts {
		hosts[i] = t.TempDir()
		if _, err := pullT(t, srv.URL, hosts[i], "img", PullOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	publishT(t, pub, "img", g2, PublishOptions{})
	before := srv.Requests(t)
	var wg sync.WaitGroup
	outs := make([]string, len(hosts))
	errs := make([]error, len(hosts))
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := exec.Command(bin, "pull", srv.URL, "--name", "img", "--store-dir", h).CombinedOutput()
			outs[i], errs[i] = string(out), err
		}()
	}
	wg.Wait()
	var total int64
	for i := range hosts {
		if errs[i] != nil {
			t.Fatalf("host %d: %v\n%s", i, errs[i], outs[i])
		}
		var n int64
		if _, err := fmt.Sscanf(outs[i][strings.Index(outs[i], " = ")+3:], "%d B", &n); err != nil {
			t.Fatalf("host %d: no byte count in %q", i, outs[i])
		}
		total += n
		t.Logf("host %d: %s", i, strings.TrimSpace(outs[i]))
		checkCurrent(t, hosts[i], "img", g2)
	}
	t.Logf("nginx served %d requests and %d bytes to 8 hosts; floor per host %d bytes", srv.Requests(t)-before, total, zstdSize(t, g1, g2))
}

type pushStoreT struct{ dir string }

func (p *pushStoreT) current() (string, error) {
	return os.Readlink(filepath.Join(p.dir, "img", "current"))
}

func countZero(img *Image) int64 {
	var n int64
	for _, h := range img.Blocks {
		if h == manifest.ZeroHash() {
			n++
		}
	}
	return n
}
