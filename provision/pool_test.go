package provision

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/store"
	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// startLibvirtd starts Debian's libvirtd (packages libvirt-daemon and
// libvirt-clients) as root with only the storage driver
// (LIBVIRT_DRIVER_DIR points at a directory holding just it: the QEMU
// driver wants the libvirt-qemu user that libvirt-daemon-system creates),
// listening only on unix sockets in a temp dir, no TCP, no TLS. It returns a
// Virsh connected to it with a transient dir pool named pool at poolDir.
func startLibvirtd(t *testing.T, pool, poolDir string) *Virsh {
	t.Helper()
	testutil.NeedRoot(t)
	tools := testutil.NeedTool(t, "libvirtd", "virsh")
	drivers := []string{"/usr/lib/x86_64-linux-gnu/libvirt/connection-driver", "/usr/lib64/libvirt/connection-driver", "/usr/lib/libvirt/connection-driver"}
	var storageDriver string
	for _, d := range drivers {
		if p := filepath.Join(d, "libvirt_driver_storage.so"); fileExists(p) {
			storageDriver = p
			break
		}
	}
	if storageDriver == "" {
		testutil.Skip(t, "libvirt's storage driver (libvirt_driver_storage.so) not found in %v: install libvirt-daemon", drivers)
	}
	// Unix socket paths are limited to 108 bytes: keep the directory short.
	dir, err := os.MkdirTemp("", "lvd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	drv := filepath.Join(dir, "drv")
	os.Mkdir(drv, 0o755)
	if err := os.Symlink(storageDriver, filepath.Join(drv, filepath.Base(storageDriver))); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "libvirtd.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("unix_sock_dir = %q\nlisten_tls = 0\nlisten_tcp = 0\n", dir)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(tools[0], "--config", conf, "--pid-file", filepath.Join(dir, "pid"))
	cmd.Env = append(os.Environ(), "LIBVIRT_DRIVER_DIR="+drv)
	logf, _ := os.Create(filepath.Join(dir, "log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
	})
	v := &Virsh{Program: tools[1], URI: "storage:///system?socket=" + filepath.Join(dir, "libvirt-sock")}
	var lastErr error
	for range 100 {
		if _, lastErr = v.do(context.Background(), "pool-create-as", pool, "dir", "--target", poolDir); lastErr == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if lastErr != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Fatalf("libvirtd did not come up: %v\nlog:\n%s", lastErr, log)
	}
	t.Cleanup(func() { v.do(context.Background(), "pool-destroy", pool) })
	return v
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestPool provisions a volume in a dir pool of a real libvirtd: created
// through vol-create-as, sparse, equal to the base (qemu-img compare), left
// untouched when it exists; then gc, told about the pool, keeps the
// generation that an overlay volume in it uses.
func TestPool(t *testing.T) {
	qimg := testutil.NeedTool(t, "qemu-img")[0]
	poolDir := t.TempDir()
	pool := fmt.Sprintf("nixvmtest%d", os.Getpid())
	v := startLibvirtd(t, pool, poolDir)
	ctx := context.Background()
	st := newStore(t)
	g1 := putGen(t, st, "baseline", testImage(30, 6*mib))

	req := Request{Kind: Pool, Image: g1.Path, Size: 40 * mib, Pool: pool, Volume: "guest-web1", Guest: "web1", Virsh: v}
	res, err := Provision(ctx, req)
	if err != nil || !res.Created {
		t.Fatalf("got %+v, %v", res, err)
	}
	path, err := v.VolPath(ctx, pool, "guest-web1")
	if err != nil || path != filepath.Join(poolDir, "guest-web1") || res.Path != path {
		t.Fatalf("vol-path: got %q, %v; result %q; want %s", path, err, res.Path, filepath.Join(poolDir, "guest-web1"))
	}
	compareWithBase(t, path, "raw", g1.Path)
	if fi, _ := os.Stat(path); fi.Size() != 40*mib {
		t.Errorf("volume size: got %d, want %d", fi.Size(), 40*mib)
	}
	if a := allocated(t, path); a > res.Written+mib {
		t.Errorf("volume occupies %d bytes, want about the %d written (sparse)", a, res.Written)
	}
	info, err := v.do(ctx, "vol-info", "--pool", pool, "--bytes", "guest-web1")
	if err != nil || !strings.Contains(info, fmt.Sprint(40*mib)) {
		t.Errorf("vol-info after pool-refresh: %v\n%s", err, info)
	}

	// Existing: untouched (write something recognisable first).
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte("the guest wrote this"), 5*mib)
	f.Close()
	before := fileHash(t, path)
	if res, err := Provision(ctx, req); err != nil || res.Created {
		t.Fatalf("existing volume: got %+v, %v", res, err)
	}
	if got := fileHash(t, path); got != before {
		t.Errorf("existing volume changed: sha256 %s, want %s", got, before)
	}

	// An overlay volume in the pool keeps its generation through gc --pool.
	ov := filepath.Join(poolDir, "ci1.qcow2")
	if _, err := Provision(ctx, Request{Kind: Overlay, Image: g1.Path, Target: ov}); err != nil {
		t.Fatal(err)
	}
	if err := v.PoolRefresh(ctx, pool); err != nil {
		t.Fatal(err)
	}
	g2 := putGen(t, st, "baseline", testImage(31, 6*mib))
	rep, err := st.GC(ctx, store.GCOptions{Disks: v.Disks([]string{pool}, false)})
	if err != nil {
		t.Fatal(err)
	}
	if kept := keptBy(rep.Decisions); len(kept) != 2 || kept[g1.Path] != "referenced" || kept[g2.Path] != "current" {
		t.Errorf("gc kept %q, want %s (referenced) and %s (current)", kept, g1.Path, g2.Path)
	}
	if len(rep.Decisions) == 2 && (len(rep.Decisions[1].Users) != 1 || rep.Decisions[1].Users[0] != ov) {
		t.Errorf("users of %s: got %q, want [%s]", g1.Path, rep.Decisions[1].Users, ov)
	}
	run(t, qimg, "check", ov)
}
