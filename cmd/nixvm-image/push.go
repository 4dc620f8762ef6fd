package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/spf13/pflag"
)

// remoteOptions say how to reach `nixvm-image serve` on a host.
type remoteOptions struct {
	SSHCommand    string
	RemoteCommand string
	StoreDir      string
}

func (o *remoteOptions) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.SSHCommand, "ssh-command", "ssh", "the ssh invocation; the host and the remote command are appended (e.g. \"ssh -F ./ssh_config -p 2222\")")
	fs.StringVar(&o.RemoteCommand, "remote-command", "nixvm-image", "path of nixvm-image on the host")
	fs.StringVar(&o.StoreDir, "store-dir", push.DefaultStoreDir, "the host's image store")
}

// shellQuote quotes s for the remote shell that ssh runs the command in.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:@+,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
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
	remote := shellQuote(o.RemoteCommand) + " serve"
	if o.StoreDir != push.DefaultStoreDir {
		remote += " --store-dir " + shellQuote(o.StoreDir)
	}
	return append(argv, host, remote), nil
}

// tailBuffer keeps the last 4 KiB written (the remote's stderr).
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
	return strings.TrimSpace(string(t.b))
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
	var ee *exec.ExitError
	if errors.As(werr, &ee) || errors.Is(ferr, push.ErrNoServer) {
		msg := stderr.String()
		code := -1
		if ee != nil {
			code = ee.ExitCode()
		}
		if errors.Is(ferr, push.ErrNoServer) {
			if code == 127 || strings.Contains(msg, "not found") || strings.Contains(msg, "No such file") {
				return fmt.Errorf("%s: nixvm-image is not installed on the host (%s): install it there (NixOS: add it to environment.systemPackages; elsewhere copy the static binary to /usr/local/bin), or pass --remote-command /path/to/nixvm-image\ncommand: %s\nremote stderr: %s", host, ferr, strings.Join(argv, " "), msg)
			}
			if code == 255 {
				return fmt.Errorf("%s: ssh failed (exit 255): %s\ncommand: %s", host, msg, strings.Join(argv, " "))
			}
		}
		if msg != "" && !errors.Is(ferr, push.ErrRemote) {
			return fmt.Errorf("%s: %w\nremote stderr: %s", host, ferr, msg)
		}
	}
	return fmt.Errorf("%s: %w", host, ferr)
}

type pushOptions struct {
	remoteOptions
	Image    string
	Name     string
	Link     string
	Quiet    bool
	CacheDir string
}

func init() {
	register(&command{
		name:    "push",
		summary: "send an image to hosts' image stores, only the blocks they lack",
		usage:   "HOST... --image IMAGE.qcow2 --name NAME [flags]",
		help: `Each host gets the image as a new generation of NAME in its store
(` + push.DefaultStoreDir + `/NAME/<digest>.qcow2, read-only) and its
'current' symlink is swapped to it once the host has checked the digest of
what it wrote. Only 4 KiB blocks the host does not hold in any generation
travel, zstd-compressed; an interrupted push resumes where it stopped.
Hosts are pushed in parallel over ssh, which runs 'nixvm-image serve' there.

Examples:
  nixvm-image push athens rome --image baseline.qcow2 --name baseline
  nixvm-image push athens --image baseline.qcow2 --name baseline \
      --link /etc/virt/base-images/baseline.qcow2
  nixvm-image push athens --image b.qcow2 --name b --ssh-command "ssh -F ./ssh_config"

For each host the last line says the bytes sent against the image size.

The manifests (block hashes) of pushed images are kept in --cache-dir, the
newest 16. When a host holds a generation whose manifest is cached, the host
need not send its block index: pushing a rebuild from the same machine then
costs the host a reply of a few hundred bytes. Without it the index costs
3 bytes per distinct 4 KiB block the host holds (4 beyond 8 GiB of them).`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &pushOptions{}
			fs.StringVar(&o.Image, "image", "", "the image to push (qcow2 or raw)")
			fs.StringVar(&o.Name, "name", "", "the image name on the hosts (letters, digits, '.', '_', '-')")
			fs.StringVar(&o.Link, "link", "", "also point this path on the host at the new generation")
			o.remoteOptions.addFlags(fs)
			fs.BoolVarP(&o.Quiet, "quiet", "q", false, "no progress, only the summary lines and errors")
			fs.StringVar(&o.CacheDir, "cache-dir", "", "where to keep the manifests of pushed images, so hosts holding one need not send their index (default $XDG_CACHE_HOME/nixvm-image/manifests; \"none\": no cache)")
			return func(ctx context.Context, c Context, args []string) error { return runPush(ctx, o, c, args) }
		},
	})
}

func runPush(ctx context.Context, o *pushOptions, c Context, hosts []string) error {
	if len(hosts) == 0 {
		return usagef("name at least one HOST")
	}
	if o.Image == "" {
		return usagef("--image is required")
	}
	if err := push.ValidName(o.Name); err != nil {
		return usageError{fmt.Errorf("--name: %w", err)}
	}
	if o.Link != "" && !strings.HasPrefix(o.Link, "/") {
		return usagef("--link %q must be an absolute path on the host", o.Link)
	}
	for _, h := range hosts {
		if _, err := o.sshArgv(h); err != nil {
			return err
		}
	}
	start := time.Now()
	var hashed atomic.Int64
	prog := newHostProgress(c.Stderr, o.Quiet, []string{"hashing"})
	prog.total[0] = -1
	stop := prog.run(func() { prog.done[0].Store(hashed.Load()) })
	src, err := push.OpenSource(o.Image, func(n int64) { hashed.Add(n) })
	stop()
	if err != nil {
		return fmt.Errorf("--image: %w", err)
	}
	defer src.Close()
	var cache *push.Cache
	switch o.CacheDir {
	case "none":
	case "":
		if d, err := push.DefaultCacheDir(); err == nil {
			cache = &push.Cache{Dir: d}
		} else if !o.Quiet {
			fmt.Fprintf(c.Stderr, "no manifest cache: %v\n", err)
		}
	default:
		cache = &push.Cache{Dir: o.CacheDir}
	}
	if cache != nil && src.FromManifest {
		// Built here: other machines may push it, so keep it from the start.
		keepManifest(c, cache, src)
	}
	if !o.Quiet {
		fmt.Fprintf(c.Stderr, "%s: %s virtual, digest %x, hashed in %s\n", o.Image, units.Bytes(src.VirtualSize), src.Digest[:8], time.Since(start).Round(time.Millisecond))
	}

	prog = newHostProgress(c.Stderr, o.Quiet, hosts)
	stats := make([]*push.Stats, len(hosts))
	errs := make([]error, len(hosts))
	took := make([]time.Duration, len(hosts))
	for i := range hosts {
		prog.total[i] = src.VirtualSize
	}
	stop = prog.run(nil)
	var wg sync.WaitGroup
	for i, host := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			errs[i] = o.remoteSession(ctx, host, func(conn io.ReadWriter) error {
				cc := &countConn{rw: conn, n: &prog.sent[i]}
				var err error
				stats[i], err = push.Push(ctx, cc, src, push.Options{
					Name: o.Name, Link: o.Link,
					Progress: func(n int64) { prog.done[i].Add(n) },
					Cache:    cache,
				})
				return err
			})
			took[i] = time.Since(t0)
		}()
	}
	wg.Wait()
	stop()
	// A host holds the image now: keep its manifest (it is kept already
	// when the builder wrote one, see above).
	for i := range hosts {
		if errs[i] == nil && cache != nil {
			keepManifest(c, cache, src)
			break
		}
	}
	failed := 0
	for i, host := range hosts {
		st := stats[i]
		if errs[i] != nil {
			failed++
			fmt.Fprintf(c.Stderr, "%s: FAILED: %v\n", host, errs[i])
			continue
		}
		what := "sent"
		if st.AlreadyCurrent {
			what = "already held; sent"
		} else if st.ResumedAt > 0 {
			what = fmt.Sprintf("resumed at %s; sent", units.Bytes(st.ResumedAt*push.BlockSize))
		}
		index := ""
		if st.CachedGens > 0 || st.IndexEntries > 0 {
			index = fmt.Sprintf(" (host generations known from the manifest cache: %d, indexed: %d with %d blocks)", st.CachedGens, st.IndexedGens, st.IndexEntries)
		}
		fmt.Fprintf(c.Stdout, "%s: %s %x %s %s = %d B (%.2f%%) of a %s image, received %s = %d B%s, in %s\n",
			host, o.Name, src.Digest[:8], what, units.Bytes(st.Sent), st.Sent, 100*float64(st.Sent)/float64(src.VirtualSize),
			units.Bytes(src.VirtualSize), units.Bytes(st.Received), st.Received, index, took[i].Round(time.Millisecond))
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d hosts failed", failed, len(hosts))
	}
	return nil
}

func keepManifest(c Context, cache *push.Cache, src *push.Source) {
	if err := cache.Put(src); err != nil {
		fmt.Fprintf(c.Stderr, "warning: keeping the manifest in %s: %v\n", cache.Dir, err)
	}
}

type countConn struct {
	rw io.ReadWriter
	n  *atomic.Int64
}

func (c *countConn) Read(p []byte) (int, error) { return c.rw.Read(p) }
func (c *countConn) Write(p []byte) (int, error) {
	n, err := c.rw.Write(p)
	c.n.Add(int64(n))
	return n, err
}
