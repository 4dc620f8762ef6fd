package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// sshHost is a real OpenSSH sshd on a loopback port with its own host key,
// reachable as "testhost" through the ssh config in SSHCommand.
type sshHost struct {
	SSHCommand string
	Dir        string
}

func startSSHD(t *testing.T) *sshHost {
	t.Helper()
	testutil.NeedRoot(t)
	tools := testutil.NeedTool(t, "sshd", "ssh", "ssh-keygen")
	sshd, ssh, keygen := tools[0], tools[1], tools[2]
	dir := t.TempDir()
	run := func(argv ...string) {
		t.Helper()
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
	}
	run(keygen, "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, "host_key"))
	run(keygen, "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, "client_key"))
	clientPub, _ := os.ReadFile(filepath.Join(dir, "client_key.pub"))
	hostPub, _ := os.ReadFile(filepath.Join(dir, "host_key.pub"))
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("authorized_keys", string(clientPub))
	write("known_hosts", "testhost "+string(hostPub))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cfg := write("sshd_config", fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s/host_key
AuthorizedKeysFile %s/authorized_keys
PidFile %s/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
`, port, dir, dir, dir))
	sshCfg := write("ssh_config", fmt.Sprintf(`Host testhost
  HostName 127.0.0.1
  Port %d
  User root
  HostKeyAlias testhost
  IdentityFile %s/client_key
  IdentitiesOnly yes
  UserKnownHostsFile %s/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
`, port, dir, dir))
	os.MkdirAll("/run/sshd", 0o755) // privilege separation directory
	cmd := exec.Command(sshd, "-D", "-e", "-f", cfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no stray sshd if the test dies
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	h := &sshHost{SSHCommand: ssh + " -F " + sshCfg, Dir: dir}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := exec.Command(ssh, "-F", sshCfg, "testhost", "true").CombinedOutput()
		if err == nil {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshd did not come up: %v: %s\nsshd log: %s", err, out, log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// buildSelf returns the static nixvm-image binary the "host" runs as its
// serve command (the one the VM tests use).
func buildSelf(t *testing.T) string {
	t.Helper()
	return staticNixvmImage(t)
}

// TestPushLocalSubprocess runs the host half as a local subprocess through
// a stand-in for ssh, then lists the store with and without a host.
func TestPushLocalSubprocess(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	bin := buildSelf(t)
	dir := t.TempDir()
	fake := filepath.Join(dir, "fake-ssh")
	// Run the command locally, with a store per host: --store-dir comes last.
	os.WriteFile(fake, []byte("#!/bin/sh\nh=$1\nshift\nexec sh -c \"$1/$h\"\n"), 0o755)
	img := filepath.Join(dir, "a.raw")
	data := make([]byte, 2<<20)
	rand.New(rand.NewSource(5)).Read(data[1<<20:])
	os.WriteFile(img, data, 0o644)
	store := filepath.Join(dir, "store")
	remote := []string{"--ssh-command", fake, "--remote-command", bin, "--store-dir", store}
	code, out, errs := cli(t, append([]string{"push", "athens", "rome", "--image", img, "--name", "baseline", "-q"}, remote...)...)
	if code != 0 || strings.Count(out, " sent ") != 2 {
		t.Fatalf("push to two hosts: exit %d\n%s%s", code, out, errs)
	}
	for _, args := range [][]string{{"images", "--store-dir", filepath.Join(store, "rome")}, append([]string{"images", "athens"}, remote...)} {
		code, out, errs = cli(t, args...)
		if code != 0 || strings.Count(out, "\nbaseline ") != 1 || !strings.Contains(out, " * ") {
			t.Errorf("%s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
		}
	}
	code, _, errs = cli(t, "push", "athens", "--image", img, "--name", "../etc")
	if code != 2 || !strings.Contains(errs, "--name") {
		t.Errorf("bad --name: exit %d, want 2\n%s", code, errs)
	}
}

// fixture writes a qcow2 (compressed, as the builder writes them) of data.
func fixture(t *testing.T, qemuImg, dir, name string, data []byte) string {
	t.Helper()
	raw := filepath.Join(dir, name+".raw")
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, name+".qcow2")
	if out, err := exec.Command(qemuImg, "convert", "-f", "raw", "-O", "qcow2", "-c", raw, q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	return q
}

func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Context{Stdout: &out, Stderr: &errb, Args: args}.Execute(context.Background())
	return code, out.String(), errb.String()
}

var (
	sentRE     = regexp.MustCompile(`sent \S+ \S+ = (\d+) B`)
	receivedRE = regexp.MustCompile(`received \S+ \S+ = (\d+) B`)
)

func receivedBytes(t *testing.T, stdout string) int64 {
	t.Helper()
	m := receivedRE.FindStringSubmatch(stdout)
	if m == nil {
		t.Fatalf("no 'received ... = N B' in %q", stdout)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

func sentBytes(t *testing.T, stdout string) int64 {
	t.Helper()
	m := sentRE.FindStringSubmatch(stdout)
	if m == nil {
		t.Fatalf("no 'sent ... = N B' in %q", stdout)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

func TestPushOverSSH(t *testing.T) {
	qemuImg := testutil.NeedTool(t, "qemu-img")[0]
	host := startSSHD(t)
	bin := buildSelf(t)
	dir := t.TempDir()
	cacheHome := filepath.Join(dir, "cache")
	t.Setenv("XDG_CACHE_HOME", cacheHome) // the default --cache-dir
	store := filepath.Join(dir, "store")
	link := filepath.Join(dir, "etc", "virt", "base-images", "baseline.qcow2")

	const size = 32 << 20
	gen1 := make([]byte, size)
	rnd := rand.New(rand.NewSource(1))
	for off := 0; off < size; off += 64 << 10 {
		if off%(256<<10) != 0 { // a quarter stays zero
			rnd.Read(gen1[off : off+64<<10])
		}
	}
	img1 := fixture(t, qemuImg, dir, "gen1", gen1)
	gen2 := bytes.Clone(gen1)
	rnd.Read(gen2[10<<20 : 10<<20+40<<10]) // ten changed blocks
	img2 := fixture(t, qemuImg, dir, "gen2", gen2)

	common := []string{"--name", "baseline", "--ssh-command", host.SSHCommand, "--remote-command", bin, "--store-dir", store}
	cur := filepath.Join(store, "baseline", "current")

	code, out, errs := cli(t, append([]string{"push", "testhost", "--image", img1, "--link", link, "-q"}, common...)...)
	if code != 0 {
		t.Fatalf("first push: exit %d\n%s%s", code, out, errs)
	}
	first := sentBytes(t, out)
	t.Logf("first push: %s", strings.TrimSpace(out))
	if out, err := exec.Command(qemuImg, "compare", img1, cur).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare gen1 current: %v: %s", err, out)
	}
	if out, err := exec.Command(qemuImg, "compare", img1, link).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare gen1 --link: %v: %s", err, out)
	}
	cur1, _ := os.Readlink(cur)

	code, out, errs = cli(t, append([]string{"push", "testhost", "--image", img2}, common...)...)
	if code != 0 {
		t.Fatalf("second push: exit %d\n%s%s", code, out, errs)
	}
	second := sentBytes(t, out)
	t.Logf("second push: %s", strings.TrimSpace(out))
	if out, err := exec.Command(qemuImg, "compare", img2, cur).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare gen2 current: %v: %s", err, out)
	}
	if out, err := exec.Command(qemuImg, "check", cur).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check current: %v: %s", err, out)
	}
	if cur2, _ := os.Readlink(cur); cur2 == cur1 {
		t.Fatalf("current still points at %s", cur1)
	}
	// Ten random blocks are ~41 KiB; allow the frames around them.
	if second > 48<<10 || second*50 > first {
		t.Errorf("second push sent %d bytes (first %d), want at most 48 KiB", second, first)
	}
	// The first push kept gen1's manifest: the host sent no index back.
	if got := receivedBytes(t, out); got > 4096 || !strings.Contains(out, "manifest cache: 1, indexed: 0") {
		t.Errorf("second push with gen1's manifest cached: received %d bytes, want a reply under 4 KiB\n%s", got, out)
	}
	if ents, err := os.ReadDir(filepath.Join(cacheHome, "nixvm-image", "manifests")); err != nil || len(ents) != 2 {
		t.Errorf("manifest cache: got %d entries, %v; want gen1 and gen2", len(ents), err)
	}

	// Identical re-push: the handshake only.
	code, out, errs = cli(t, append([]string{"push", "testhost", "--image", img2, "-q"}, common...)...)
	if code != 0 || sentBytes(t, out) > 512 {
		t.Fatalf("identical re-push: exit %d, want 0 and under 512 bytes sent\n%s%s", code, out, errs)
	}

	// images over ssh lists both generations, the current one marked.
	code, out, errs = cli(t, "images", "testhost", "--ssh-command", host.SSHCommand, "--remote-command", bin, "--store-dir", store)
	if code != 0 || strings.Count(out, "\nbaseline ") != 2 || strings.Count(out, " * ") != 1 {
		t.Fatalf("images: exit %d\n%s%s", code, out, errs)
	}

	// A cut connection over real ssh: ssh's stdin ends after 2 MiB.
	gen3 := bytes.Clone(gen2)
	rnd.Read(gen3[16<<20 : 20<<20])
	img3 := fixture(t, qemuImg, dir, "gen3", gen3)
	cutter := filepath.Join(dir, "cut.sh")
	stdbuf := testutil.NeedTool(t, "stdbuf")[0] // head's stdio would hold the hello back
	os.WriteFile(cutter, []byte("#!/bin/sh\n"+stdbuf+" -o0 head -c 2097152 | "+host.SSHCommand+" \"$@\"\n"), 0o755)
	withCut := append([]string{"push", "testhost", "--image", img3, "-q"}, common...)
	withCut[len(withCut)-5] = cutter // --ssh-command value
	code, out, errs = cli(t, withCut...)
	if code == 0 {
		t.Fatalf("cut push succeeded: %s", out)
	}
	if c, _ := os.Readlink(cur); c == cur1 || c == "" {
		t.Fatalf("after the cut current is %q", c)
	}
	if out, err := exec.Command(qemuImg, "compare", img2, cur).CombinedOutput(); err != nil {
		t.Fatalf("after the cut current is not gen2: %v: %s", err, out)
	}
	code, out, errs = cli(t, append([]string{"push", "testhost", "--image", img3}, common...)...)
	if code != 0 || !strings.Contains(out, "resumed at") {
		t.Fatalf("push after the cut: exit %d, want a resumed push\n%s%s", code, out, errs)
	}
	t.Logf("after the cut: %s", strings.TrimSpace(out))
	if out, err := exec.Command(qemuImg, "compare", img3, cur).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare gen3 current: %v: %s", err, out)
	}

	// Without the cache the host sends its compact index: 3 bytes per
	// distinct non-zero block of gen1..gen3 (6144 + 10 + 1024 blocks).
	gen4 := bytes.Clone(gen3)
	rnd.Read(gen4[30<<20 : 30<<20+8<<10])
	img4 := fixture(t, qemuImg, dir, "gen4", gen4)
	code, out, errs = cli(t, append([]string{"push", "testhost", "--image", img4, "--cache-dir", "none"}, common...)...)
	if code != 0 {
		t.Fatalf("push without a cache: exit %d\n%s%s", code, out, errs)
	}
	t.Logf("without a cache: %s", strings.TrimSpace(out))
	if got := receivedBytes(t, out); got < 3*6144 || got > 3*7178*21/20+4096 {
		t.Errorf("push without a cache: received %d bytes, want about 3 per host block (%d)", got, 3*7178)
	}
	if out, err := exec.Command(qemuImg, "compare", img4, cur).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare gen4 current: %v: %s", err, out)
	}

	// A host without nixvm-image: the error says how to install it.
	code, _, errs = cli(t, append([]string{"push", "testhost", "--image", img1}, append(common, "--remote-command", "/nonexistent/nixvm-image")...)...)
	if code != 1 || !strings.Contains(errs, "not installed") || !strings.Contains(errs, "--remote-command") {
		t.Fatalf("missing remote binary: exit %d, want 1 and an install hint\n%s", code, errs)
	}
}

func TestSSHArgv(t *testing.T) {
	for _, tc := range []struct {
		o    remoteOptions
		host string
		want string
	}{
		{remoteOptions{SSHCommand: "ssh", RemoteCommand: "nixvm-image", StoreDir: "/var/lib/nixvm-image/images"}, "athens", "ssh athens nixvm-image serve"},
		{remoteOptions{SSHCommand: "ssh -F cfg", RemoteCommand: "/opt/nix vm/nixvm-image", StoreDir: "/srv/it's"}, "root@rome", `ssh -F cfg root@rome '/opt/nix vm/nixvm-image' serve --store-dir '/srv/it'\''s'`},
	} {
		argv, err := tc.o.sshArgv(tc.host)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(argv, " "); got != tc.want {
			t.Errorf("got %s, want %s", got, tc.want)
		}
	}
	if _, err := (&remoteOptions{SSHCommand: "ssh"}).sshArgv("-oProxyCommand=x"); err == nil {
		t.Error("a host starting with '-' was accepted")
	}
}
