package main

import (
	"context"
	"time"

	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type serveOptions struct {
	StoreDir string
	Idle     time.Duration
}

func (o *serveOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.StoreDir, "store-dir", store.DefaultDir, "the image store")
	fs.DurationVar(&o.Idle, "idle-timeout", push.DefaultIdleTimeout,
		"give up on a peer that sends no frame (or reads nothing) for this long: the lock is released and the push resumes later")
}

func init() {
	register(&command{
		name:    "serve",
		summary: "host side of push and images: speak the protocol on stdin/stdout",
		usage:   "[--store-dir DIR] [--idle-timeout DURATION]",
		help: `Runs one session on stdin and stdout; 'nixvm-image push' and
'nixvm-image images HOST' start it over ssh. Not meant to be run by hand.

The store holds DIR/NAME/<digest>.qcow2 (immutable, read-only, uncompressed
sparse qcow2), DIR/NAME/<digest>.qcow2.manifest, the DIR/NAME/current symlink, a
per-name lock file and, while a push is under way, DIR/NAME/.partial/.`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &serveOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runServe(ctx, o, c, args) }
		},
	})
}

func runServe(ctx context.Context, o *serveOptions, c Context, args []string) error {
	if len(args) != 0 {
		return usagef("serve takes no arguments, got %q", args)
	}
	if o.Idle <= 0 {
		return usagef("--idle-timeout must be positive, got %s", o.Idle)
	}
	return push.ServeIdle(ctx, pipeConn{c.Stdin, c.Stdout}, &store.Store{Dir: o.StoreDir}, o.Idle)
}
