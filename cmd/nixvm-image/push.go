package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type pushOptions struct {
	remoteOptions
	Image    string
	Name     string
	Link     string
	Quiet    bool
	CacheDir string
}

func (o *pushOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Image, "image", "", "the image to push (qcow2 or raw)")
	fs.StringVar(&o.Name, "name", "", "the image name on the hosts (letters, digits, '.', '_', '-')")
	fs.StringVar(&o.Link, "link", "", "also point this path on the host at the new generation")
	o.remoteOptions.AddFlags(fs)
	fs.BoolVarP(&o.Quiet, "quiet", "q", false, "no progress, only the summary lines and errors")
	fs.StringVar(&o.CacheDir, "cache-dir", "", "where to keep the manifests of pushed images, so hosts holding one need not send their index (default $XDG_CACHE_HOME/nixvm-image/manifests; \"none\": no cache)")
}

func init() {
	register(&command{
		name:    "push",
		summary: "send an image to hosts' image stores, only the blocks they lack",
		usage:   "HOST... --image IMAGE.qcow2 --name NAME [flags]",
		help: `Each host gets the image as a new generation of NAME in its store
(` + store.DefaultDir + `/NAME/<digest>.qcow2, read-only) and its
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
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runPush(ctx, o, c, args) }
		},
	})
}

func runPush(ctx context.Context, o *pushOptions, c Context, hosts []string) error {
	if err := o.check(hosts); err != nil {
		return err
	}
	src, err := o.openSource(c)
	if err != nil {
		return err
	}
	defer src.Close()
	cache := o.cache(c)
	if cache != nil && src.FromManifest {
		// Built here: other machines may push it, so keep it from the start.
		keepManifest(c, cache, src)
	}
	res := o.pushAll(ctx, c, hosts, src, cache)
	// A host holds the image now: keep its manifest (it is kept already
	// when the builder wrote one, see above).
	for _, r := range res {
		if r.err == nil && cache != nil {
			keepManifest(c, cache, src)
			break
		}
	}
	return o.report(c, hosts, src, res)
}

// pushOpts are the library options of a push to one host.
func (o *pushOptions) pushOpts() push.Options {
	return push.Options{Name: o.Name, Link: o.Link}
}

// check checks the flags and hosts before anything is read or started.
func (o *pushOptions) check(hosts []string) error {
	if len(hosts) == 0 {
		return usagef("name at least one HOST")
	}
	if o.Image == "" {
		return usagef("--image is required")
	}
	opts := o.pushOpts()
	if err := opts.Validate(); err != nil {
		if errors.Is(err, store.ErrName) {
			return usageError{fmt.Errorf("--name: %w", err)}
		}
		return usageError{fmt.Errorf("--link: %w", err)}
	}
	for _, h := range hosts {
		if _, err := o.sshArgv(h); err != nil {
			return err
		}
	}
	return nil
}

// openSource opens the image and its block hashes, with progress while it
// hashes.
func (o *pushOptions) openSource(c Context) (*push.Source, error) {
	start := time.Now()
	var hashed atomic.Int64
	prog := newHostProgress(c.Stderr, o.Quiet, []string{"hashing"})
	prog.total[0] = -1
	stop := prog.run(func() { prog.done[0].Store(hashed.Load()) })
	src, err := push.OpenSource(o.Image, func(n int64) { hashed.Add(n) })
	stop()
	if err != nil {
		return nil, fmt.Errorf("--image: %w", err)
	}
	if !o.Quiet {
		fmt.Fprintf(c.Stderr, "%s: %s virtual, digest %x, hashed in %s\n", o.Image, units.Bytes(src.VirtualSize), src.Digest[:8], time.Since(start).Round(time.Millisecond))
	}
	return src, nil
}

// cache is the manifest cache --cache-dir names, or nil.
func (o *pushOptions) cache(c Context) *push.Cache {
	switch o.CacheDir {
	case "none":
		return nil
	case "":
		d, err := push.DefaultCacheDir()
		if err != nil {
			if !o.Quiet {
				fmt.Fprintf(c.Stderr, "no manifest cache: %v\n", err)
			}
			return nil
		}
		return &push.Cache{Dir: d}
	default:
		return &push.Cache{Dir: o.CacheDir}
	}
}

// hostResult is how the push to one host went.
type hostResult struct {
	stats *push.Stats
	err   error
	took  time.Duration
}

// pushAll pushes src to every host at once, with one progress line each.
func (o *pushOptions) pushAll(ctx context.Context, c Context, hosts []string, src *push.Source, cache *push.Cache) []hostResult {
	prog := newHostProgress(c.Stderr, o.Quiet, hosts)
	for i := range hosts {
		prog.total[i] = src.VirtualSize
	}
	stop := prog.run(nil)
	defer stop()
	res := make([]hostResult, len(hosts))
	var wg sync.WaitGroup
	for i, host := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			res[i].err = o.remoteSession(ctx, host, func(conn io.ReadWriter) error {
				cc := &countConn{rw: conn, n: &prog.sent[i]}
				opts := o.pushOpts()
				opts.Progress = func(n int64) { prog.done[i].Add(n) }
				opts.Cache = cache
				var err error
				res[i].stats, err = push.Push(ctx, cc, src, opts)
				return err
			})
			res[i].took = time.Since(t0)
		}()
	}
	wg.Wait()
	return res
}

// report prints one line per host: what was sent, or why it failed.
func (o *pushOptions) report(c Context, hosts []string, src *push.Source, res []hostResult) error {
	failed := 0
	for i, host := range hosts {
		st := res[i].stats
		if res[i].err != nil {
			failed++
			fmt.Fprintf(c.Stderr, "%s: FAILED: %v\n", host, res[i].err)
			continue
		}
		what := "sent"
		if st.AlreadyCurrent {
			what = "already held; sent"
		} else if st.ResumedAt > 0 {
			what = fmt.Sprintf("resumed at %s; sent", units.Bytes(st.ResumedAt*manifest.BlockSize))
		}
		index := ""
		if st.CachedGens > 0 || st.IndexEntries > 0 {
			index = fmt.Sprintf(" (host generations known from the manifest cache: %d, indexed: %d with %d blocks)", st.CachedGens, st.IndexedGens, st.IndexEntries)
		}
		fmt.Fprintf(c.Stdout, "%s: %s %x %s %s = %d B (%.2f%%) of a %s image, received %s = %d B%s, in %s\n",
			host, o.Name, src.Digest[:8], what, units.Bytes(st.Sent), st.Sent, 100*float64(st.Sent)/float64(src.VirtualSize),
			units.Bytes(src.VirtualSize), units.Bytes(st.Received), st.Received, index, res[i].took.Round(time.Millisecond))
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
