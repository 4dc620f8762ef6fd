package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"strings"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/publish"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type pullOptions struct {
	name     string
	link     string
	storeDir string
	endpoint string
	region   string
	trust    []string
	parallel int
	older    bool
	quiet    bool
}

func (o *pullOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.name, "name", "", "the image `NAME` to pull")
	fs.StringVar(&o.link, "link", "", "also point this `PATH` at the new generation (e.g. /etc/virt/base-images/baseline.qcow2)")
	fs.StringVar(&o.storeDir, "store-dir", store.DefaultDir, "this host's image store")
	fs.StringVar(&o.endpoint, "endpoint", "", "S3 endpoint `URL` for non-AWS stores (default $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")
	fs.StringVar(&o.region, "region", "", "S3 region (default $AWS_REGION, else asked from the bucket)")
	fs.StringArrayVar(&o.trust, "trust", nil, "only install generations whose NAME/latest is signed by this ed25519 public `KEY` (the .pub line, its base64, or a file); repeatable")
	fs.IntVar(&o.parallel, "parallel", 4, "range requests in flight")
	fs.BoolVar(&o.older, "allow-older", false, "install NAME/latest even when it was published before the generation this host last pulled (a deliberate rollback)")
	fs.BoolVarP(&o.quiet, "quiet", "q", false, "no retry notices, only the summary line and errors")
}

func init() {
	register(&command{
		name:    "pull",
		summary: "fetch the newest published generation of an image, only the blocks this host lacks",
		usage:   "URL --name NAME [flags]",
		help: `Reads URL/NAME/latest (URL: http(s)://…, s3://BUCKET/PREFIX or file:///DIR, as
written by 'nixvm-image publish'), compares its block list with every
generation of NAME in the store, fetches the missing blocks with merged range
requests, checks each block and the image digest, and installs the result as
push does: a new read-only generation, 'current' swapped, --link set.
Failed requests are retried with backoff; a cut pull resumes from what it
had written. Nothing changes unless the whole image verified.

With --trust, NAME/latest must be signed (publish --sign-key) by one of the
given keys; an unsigned or foreign-signed generation is refused.

Examples:
  nixvm-image pull https://cache.example/nixvm --name baseline
  nixvm-image pull s3://images/nixvm --name baseline --link /etc/virt/base-images/baseline.qcow2
  nixvm-image pull https://cache.example/nixvm --name baseline --trust /etc/nixvm/publish.key.pub`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &pullOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runPull(ctx, o, c, args) }
		},
	})
}

func runPull(ctx context.Context, o *pullOptions, c Context, args []string) error {
	if len(args) != 1 {
		return usagef("give one URL")
	}
	if err := publish.ValidName(o.name); err != nil {
		return usageError{fmt.Errorf("--name: %w", err)}
	}
	if o.link != "" && !strings.HasPrefix(o.link, "/") {
		return usagef("--link %q must be an absolute path", o.link)
	}
	var trust []ed25519.PublicKey
	for _, k := range o.trust {
		pk, err := publish.ParsePublicKey(k)
		if err != nil {
			return usageError{fmt.Errorf("--trust: %w", err)}
		}
		trust = append(trust, pk)
	}
	src, err := publish.Open(args[0], publish.Options{Endpoint: o.endpoint, Region: o.region})
	if err != nil {
		return usageError{err}
	}
	start := time.Now()
	opts := publish.PullOptions{
		Source: src, Store: publish.NewHostStore(o.storeDir),
		Name: o.name, Link: o.link, Trust: trust, Parallel: o.parallel, AllowOlder: o.older,
	}
	if !o.quiet {
		opts.Log = func(format string, a ...any) { fmt.Fprintf(c.Stderr, "pull: "+format+"\n", a...) }
	}
	st, err := publish.Pull(ctx, opts)
	if err != nil {
		return err
	}
	what := "installed"
	switch {
	case st.AlreadyHeld:
		what = "already held; made current"
	case st.Delta:
		what = "installed (delta)"
	}
	fmt.Fprintf(c.Stdout, "%s %x: %s; fetched %s = %d B in %d requests (%d ranges), %d blocks fetched, %d copied from local generations, %d resumed, of a %s image, in %s\n",
		o.name, st.Digest[:8], what, units.Bytes(st.Bytes), st.Bytes, st.Requests, st.RangeRequests, st.FetchedBlocks, st.LocalBlocks, st.Resumed,
		units.Bytes(st.VirtualSize), time.Since(start).Round(time.Millisecond))
	return nil
}
