package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"

	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

// The ssh transport of push and images: the system ssh (the user's config,
// agent, known_hosts and ProxyJump all work) runs `nixvm-image serve` on the
// host, and the session speaks over its stdin and stdout. --ssh-command is
// the seam: tests put a local stand-in or an ssh to a loopback sshd there.

// remoteOptions say how to reach `nixvm-image serve` on a host.
type remoteOptions struct {
	SSHCommand    string
	RemoteCommand string
	StoreDir      string
}

func (o *remoteOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.SSHCommand, "ssh-command", "ssh", "the ssh invocation; the host and the remote command are appended (e.g. \"ssh -F ./ssh_config -p 2222\")")
	fs.StringVar(&o.RemoteCommand, "remote-command", "nixvm-image", "path of nixvm-image on the host")
	fs.StringVar(&o.StoreDir, "store-dir", store.DefaultDir, "the host's image store")
}

// sshArgv is the command line that runs serve on host.
func (o *remoteOptions) sshArgv(host string) ([]string, error) {
	argv := strings.Fields(o.SSHCommand)
	if len(argv) == 0 {
		return nil, usagef("--ssh-command is empty")
	}
	if host == "" || strings.HasPrefix(host, "-") {
		return nil, usagef("host %q: want a host name as ssh takes it", host)
	}
	remote := shquote.Quote(o.RemoteCommand) + " serve"
	if o.StoreDir != store.DefaultDir {
		remote += " --store-dir " + shquote.Quote(o.StoreDir)
	}
	return append(argv, host, remote), nil
}

// tailBuffer keeps the last 4 KiB written (the remote's stderr); String
// strips what could drive the user's terminal (escape sequences, control
// characters): the host is not trusted to write there.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > 4096 {
		t.b = t.b[len(t.b)-4096:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(push.Sanitize(string(t.b), true))
}

type pipeConn struct {
	io.Reader
	io.Writer
}

// remoteSession runs serve on host over ssh and calls f with the connection.
func (o *remoteOptions) remoteSession(ctx context.Context, host string, f func(conn io.ReadWriter) error) error {
	argv, err := o.sshArgv(host)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr := &tailBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %q (--ssh-command): %w", argv[0], err)
	}
	ferr := f(pipeConn{stdout, stdin})
	stdin.Close()
	werr := cmd.Wait()
	if ferr == nil {
		return nil
	}
	return explainRemote(host, argv, ferr, werr, stderr.String())
}

// explainRemote turns a failed session into an error that says what to do:
// install nixvm-image on the host, fix ssh, or read the remote's stderr.
func explainRemote(host string, argv []string, ferr, werr error, stderr string) error {
	var ee *exec.ExitError
	if !errors.As(werr, &ee) && !errors.Is(ferr, push.ErrNoServer) {
		return fmt.Errorf("%s: %w", host, ferr)
	}
	code := -1
	if ee != nil {
		code = ee.ExitCode()
	}
	if errors.Is(ferr, push.ErrNoServer) {
		if code == 127 || strings.Contains(stderr, "not found") || strings.Contains(stderr, "No such file") {
			return fmt.Errorf("%s: nixvm-image is not installed on the host (%s): install it there (NixOS: add it to environment.systemPackages; elsewhere copy the static binary to /usr/local/bin), or pass --remote-command /path/to/nixvm-image\ncommand: %s\nremote stderr: %s", host, ferr, strings.Join(argv, " "), stderr)
		}
		if code == 255 {
			return fmt.Errorf("%s: ssh failed (exit 255): %s\ncommand: %s", host, stderr, strings.Join(argv, " "))
		}
	}
	if stderr != "" && !errors.Is(ferr, push.ErrRemote) {
		return fmt.Errorf("%s: %w\nremote stderr: %s", host, ferr, stderr)
	}
	return fmt.Errorf("%s: %w", host, ferr)
}
