package publish

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// toolsDir is where scripts/build-test-servers puts weed and desync.
func toolsDir() string {
	if d := os.Getenv("NIXVM_TOOLS_DIR"); d != "" {
		return d
	}
	d, _ := os.UserCacheDir()
	return filepath.Join(d, "nixvm-image", "tools")
}

// startWeed runs a SeaweedFS server with its S3 gateway on loopback ports,
// credentials from a config written here (also exported as the standard
// AWS variables), and returns the S3 endpoint URL.
func startWeed(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(toolsDir(), "weed")
	if _, err := os.Stat(bin); err != nil {
		testutil.Skip(t, "%s missing: run scripts/build-test-servers weed (make test does)", bin)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "s3.json")
	writeFile(t, cfg, []byte(`{"identities":[{"name":"test","credentials":[{"accessKey":"nixvmtest","secretKey":"nixvmtestsecret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}`))
	t.Setenv("AWS_ACCESS_KEY_ID", "nixvmtest")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "nixvmtestsecret")
	t.Setenv("AWS_REGION", "us-east-1")
	port := func() string { return fmt.Sprint(freePort(t)) }
	s3port := port()
	args := []string{"server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir=" + dir, "-s3", "-s3.config=" + cfg,
		"-master.port=" + port(), "-master.port.grpc=" + port(), "-volume.port=" + port(), "-volume.port.grpc=" + port(),
		"-filer.port=" + port(), "-filer.port.grpc=" + port(), "-s3.port=" + s3port, "-s3.port.grpc=" + port(),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=16"}
	cmd := exec.Command(bin, args...)
	// weed's glog writes its log files to the temp dir: keep them in dir.
	cmd.Env = append(os.Environ(), "TMPDIR="+dir)
	logf, err := os.Create(filepath.Join(dir, "weed.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	done := startServer(t, cmd, logf)
	ep := "http://127.0.0.1:" + s3port
	c, err := minio.New("127.0.0.1:"+s3port, &minio.Options{Creds: credentials.NewStaticV4("nixvmtest", "nixvmtestsecret", ""), Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	// Ready when a bucket can be made and written.
	deadline := time.Now().Add(90 * time.Second)
	for {
		select {
		case <-done:
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("weed exited: %s", tail(b))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := c.MakeBucket(ctx, "images", minio.MakeBucketOptions{})
		if err == nil || minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			_, err = c.PutObject(ctx, "images", "probe", bytes.NewReader([]byte("x")), 1, minio.PutObjectOptions{})
		}
		cancel()
		if err == nil {
			c.RemoveObject(context.Background(), "images", "probe", minio.RemoveObjectOptions{})
			return ep
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("SeaweedFS S3 not ready on %s: %v\n%s", ep, err, tail(b))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func tail(b []byte) string {
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// TestPublishPullS3: publish two generations to SeaweedFS over S3 and
// pull them from there; a missing pack fails cleanly.
func TestPublishPullS3(t *testing.T) {
	ep := startWeed(t)
	ctx := context.Background()
	url := "s3://images/fleet/nixvm"
	tg, err := OpenTarget(url, Options{Endpoint: ep})
	if err != nil {
		t.Fatal(err)
	}
	g1 := testImage(71, 8<<20)
	g2 := rebuild(g1, 72, 256<<10)
	st1, err := Publish(ctx, imageOf(g1), PublishOptions{Target: tg, Name: "baseline"})
	if err != nil {
		t.Fatal(err)
	}
	host := t.TempDir()
	src, err := Open(url, Options{Endpoint: ep})
	if err != nil {
		t.Fatal(err)
	}
	pull := func() (*PullStats, error) {
		return Pull(ctx, PullOptions{Source: src, Store: NewHostStore(host), Name: "baseline", Backoff: 10 * time.Millisecond, Log: t.Logf})
	}
	ps, err := pull()
	if err != nil {
		t.Fatal(err)
	}
	checkCurrent(t, host, "baseline", g1)
	t.Logf("s3 gen1: published %d B, pulled %d B in %d requests", st1.UploadedBytes, ps.Bytes, ps.Requests)

	st2, err := Publish(ctx, imageOf(g2), PublishOptions{Target: tg, Name: "baseline"})
	if err != nil {
		t.Fatal(err)
	}
	if st2.NewBlocks == 0 || st2.NewBlocks > 80 || st2.Deltas != 1 {
		t.Fatalf("gen2 on S3: %+v", *st2)
	}
	ps, err = pull()
	if err != nil {
		t.Fatal(err)
	}
	checkCurrent(t, host, "baseline", g2)
	floor := zstdSize(t, g1, g2)
	t.Logf("s3 gen2: published %d B, pulled %d B in %d requests (%d ranges); floor %d B", st2.UploadedBytes, ps.Bytes, ps.Requests, ps.RangeRequests, floor)
	if !ps.Delta || float64(ps.Bytes) > 1.5*float64(floor)+64<<10 || ps.Requests > 8 {
		t.Fatalf("gen2 pull from S3: %+v", *ps)
	}

	// A third generation whose new pack is gone: a clear error, no change.
	g3 := rebuild(g2, 73, 64<<10)
	st3, err := Publish(ctx, imageOf(g3), PublishOptions{Target: tg, Name: "baseline"})
	if err != nil {
		t.Fatal(err)
	}
	s3t := tg.(*s3Target)
	if err := s3t.c.RemoveObject(ctx, "images", s3t.prefix+packKey(st3.PublishedPack), minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	before := storeState(t, host)
	_, err = pull()
	if err == nil || !strings.Contains(err.Error(), "pack is missing") {
		t.Fatalf("pull with a missing pack: %v", err)
	}
	t.Logf("missing pack on S3: %v", err)
	if storeState(t, host) != before {
		t.Fatal("store changed")
	}

	// Wrong credentials: refused with a hint.
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	bad, _ := Open(url, Options{Endpoint: ep})
	if _, err := bad.Get(ctx, "baseline/latest", 1<<10); err == nil || !strings.Contains(err.Error(), "AWS_ACCESS_KEY_ID") {
		t.Fatalf("wrong secret: %v", err)
	}
}
