package publish

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// words makes compressible, text-like data, as store paths mostly are.
var words = strings.Fields("nix store path derivation closure image block hash generation manifest kernel module initrd systemd unit service socket target mount bash coreutils glibc openssl python perl")

func fillText(r *rand.Rand, b []byte) {
	var s bytes.Buffer
	for s.Len() < len(b) {
		s.WriteString(words[r.IntN(len(words))])
		if r.IntN(8) == 0 {
			fmt.Fprintf(&s, "-%x\n", r.Uint64())
		} else {
			s.WriteByte(' ')
		}
	}
	copy(b, s.Bytes())
}

// testImage is a raw disk of size bytes: text-like data in extents with
// zero gaps, deterministic in seed.
func testImage(seed uint64, size int64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	img := make([]byte, size)
	for off := int64(0); off < size; {
		n := int64(r.IntN(64)+1) * BlockSize
		if r.IntN(4) != 0 {
			fillText(r, img[off:min(off+n, size)])
		}
		off += n + int64(r.IntN(8))*BlockSize
	}
	return img
}

// rebuild changes img as a layout-stable rebuild does: a few extents
// rewritten in place (a changed package) and one new extent in free space.
func rebuild(img []byte, seed uint64, changed int64) []byte {
	out := bytes.Clone(img)
	r := rand.New(rand.NewPCG(seed, 2))
	at := int64(len(out)/3) &^ (BlockSize - 1)
	fillText(r, out[at:at+changed])
	return out
}

func writeFile(t testing.TB, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func imageOf(b []byte) *Image {
	h := manifest.NewHasher(int64(len(b)), 1)
	if _, err := h.WriteAt(b, 0); err != nil {
		panic(err)
	}
	m, err := h.Finish()
	if err != nil {
		panic(err)
	}
	return &Image{R: bytes.NewReader(b), VirtualSize: m.VirtualSize, Blocks: m.Blocks, Digest: m.Digest}
}

func dirTargetT(t testing.TB, dir string) Target {
	t.Helper()
	tg, err := OpenTarget("file://"+dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

func publishT(t testing.TB, dir, name string, img []byte, o PublishOptions) *PublishStats {
	t.Helper()
	o.Target, o.Name = dirTargetT(t, dir), name
	st, err := Publish(context.Background(), imageOf(img), o)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startNginx serves root on a loopback port with Debian's nginx, from a
// configuration written here.
func startNginx(t testing.TB, root string) *nginx {
	t.Helper()
	bin := testutil.NeedTool(t, "nginx")[0]
	dir := t.TempDir()
	port := freePort(t)
	conf := fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 256; }
http {
	access_log %[1]s/access.log;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	default_type application/octet-stream;
	server {
		listen 127.0.0.1:%[2]d;
		root %[3]s;
		location / { }
	}
}
`, dir, port, root)
	cf := writeFile(t, filepath.Join(dir, "nginx.conf"), []byte(conf))
	cmd := exec.Command(bin, "-c", cf, "-p", dir, "-e", filepath.Join(dir, "error.log"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	done := startServer(t, cmd)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	for i := 0; ; i++ {
		select {
		case <-done:
			t.Fatalf("nginx exited: %s", stderr.String())
		default:
		}
		if resp, err := http.Get(url + "/"); err == nil {
			resp.Body.Close()
			return &nginx{URL: url, log: filepath.Join(dir, "access.log")}
		}
		if i > 100 {
			t.Fatalf("nginx does not answer on %s: %s", url, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startServer starts cmd, killed at the end of the test, then closes
// after; the channel is closed when cmd has exited.
func startServer(t testing.TB, cmd *exec.Cmd, after ...io.Closer) <-chan struct{} {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		for _, c := range after {
			c.Close()
		}
	})
	return done
}

// nginx is a running nginx.
type nginx struct {
	URL string
	log string
}

// Requests counts the lines of the access log: the requests nginx served.
func (n *nginx) Requests(t testing.TB) int {
	b, err := os.ReadFile(n.log)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

func pullT(t testing.TB, url, storeDir, name string, o PullOptions) (*PullStats, error) {
	t.Helper()
	src, err := Open(url, Options{})
	if err != nil {
		t.Fatal(err)
	}
	o.Source, o.Store, o.Name = src, NewHostStore(storeDir), name
	if o.Backoff == 0 {
		o.Backoff = 10 * time.Millisecond
	}
	o.Log = t.Logf
	return Pull(context.Background(), o)
}

// checkCurrent checks that name's current generation in storeDir is img,
// reading the qcow2 back, and returns its path.
func checkCurrent(t testing.TB, storeDir, name string, img []byte) string {
	t.Helper()
	s := &store.Store{Dir: storeDir}
	g, err := s.Current(name)
	if err != nil {
		t.Fatal(err)
	}
	want := imageOf(img).Digest
	if g.Digest != want {
		t.Fatalf("current is %x, want %x", g.Digest[:8], want[:8])
	}
	f, err := os.Open(g.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	q, err := qcow2reader.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(img))
	if n, err := q.ReadAt(got, 0); n != len(got) {
		t.Fatalf("reading back %s: %d bytes: %v", g.Path, n, err)
	}
	if !bytes.Equal(got, img) {
		t.Fatalf("%s does not hold the published image", g.Path)
	}
	return g.Path
}

// storeState is every file under a store with its size and mode, and every
// symlink's target: to check that a failed pull changed nothing.
func storeState(t testing.TB, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if strings.Contains(rel, ".pull") || strings.HasSuffix(rel, ".lock") {
			return nil
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			l, _ := os.Readlink(p)
			fmt.Fprintf(&b, "%s -> %s\n", rel, l)
		} else if !fi.IsDir() {
			fmt.Fprintf(&b, "%s %d %v\n", rel, fi.Size(), fi.Mode())
		}
		return nil
	})
	return b.String()
}
