package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/publish"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/spf13/pflag"
)

type publishOptions struct {
	name        string
	to          string
	endpoint    string
	region      string
	level       int
	frameBlocks int
	signKey     string
	genKey      string
	indexCache  string
	quiet       bool
}

func (o *publishOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.name, "name", "", "the image `NAME` hosts pull (letters, digits, '.', '_', '-')")
	fs.StringVar(&o.to, "to", "", "where to publish: file:///DIR (serve DIR with any HTTP server) or s3://BUCKET/PREFIX")
	fs.StringVar(&o.endpoint, "endpoint", "", "S3 endpoint `URL` for non-AWS stores (default $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")
	fs.StringVar(&o.region, "region", "", "S3 region (default $AWS_REGION, else asked from the bucket)")
	fs.IntVar(&o.level, "compression-level", 3, "zstd level of the published blocks (1 to 22)")
	fs.IntVar(&o.frameBlocks, "frame-blocks", publish.DefaultFrameBlocks, "4 KiB blocks compressed together (1 to 1024): larger compresses better, smaller wastes less when a host needs one block of a frame")
	fs.StringVar(&o.signKey, "sign-key", "", "sign NAME/latest with this ed25519 secret key `FILE` (see --gen-key); hosts check it with pull --trust")
	fs.StringVar(&o.genKey, "gen-key", "", "write a new key pair to `FILE` and FILE.pub, then exit")
	fs.StringVar(&o.indexCache, "index-cache", "", "`DIR` keeping the pack indexes read from --to, so the next publish reads only new ones (default $XDG_CACHE_HOME/nixvm-image/packs; \"none\": no cache)")
	fs.BoolVarP(&o.quiet, "quiet", "q", false, "only the summary line and errors")
}

func init() {
	register(&command{
		name:    "publish",
		summary: "publish an image once to object storage; hosts pull only the blocks they lack",
		usage:   "IMAGE.qcow2 --name NAME --to URL [flags]",
		help: `Writes IMAGE as the newest generation of NAME under URL: a pack with the
4 KiB blocks that nothing published there holds yet (zstd frames, with an
index of their hashes), recipes that rebuild the block list, and NAME/latest,
written last. Every object but NAME/latest is immutable and named by its
content, so any static HTTP server or CDN can serve the directory. Hosts run
'nixvm-image pull URL --name NAME' (in host.nix: services.nixvm.images).

S3 credentials come the standard way: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
or AWS_PROFILE in the shared credentials file, or the instance role.
One publisher per NAME at a time.

Examples:
  nixvm-image publish baseline.qcow2 --name baseline --to file:///srv/nixvm
  nixvm-image publish baseline.qcow2 --name baseline --to s3://images/nixvm
  nixvm-image publish --gen-key /etc/nixvm/publish.key
  nixvm-image publish baseline.qcow2 --name baseline --to s3://images/nixvm \
      --endpoint http://minio.lan:9000 --sign-key /etc/nixvm/publish.key`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &publishOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runPublish(ctx, o, c, args) }
		},
	})
}

func runPublish(ctx context.Context, o *publishOptions, c Context, args []string) error {
	if o.genKey != "" {
		if len(args) > 0 {
			return usagef("--gen-key takes no IMAGE")
		}
		pub, err := publish.GenerateKey(o.genKey)
		if err != nil {
			return fmt.Errorf("--gen-key: %w", err)
		}
		fmt.Fprintf(c.Stdout, "%s\n", publish.FormatPublicKey(pub))
		return nil
	}
	if len(args) != 1 {
		return usagef("give one IMAGE")
	}
	if err := o.check(); err != nil {
		return err
	}
	var key ed25519.PrivateKey
	if o.signKey != "" {
		var err error
		if key, err = publish.LoadSecretKey(o.signKey); err != nil {
			return fmt.Errorf("--sign-key: %w", err)
		}
	}
	t, err := publish.OpenTarget(o.to, publish.Options{Endpoint: o.endpoint, Region: o.region})
	if err != nil {
		return usageError{fmt.Errorf("--to: %w", err)}
	}
	start := time.Now()
	src, err := push.OpenSource(args[0], nil)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := publish.Publish(ctx, &publish.Image{R: src.R, VirtualSize: src.VirtualSize, Blocks: src.Blocks, Digest: src.Digest}, publish.PublishOptions{
		Target: t, Name: o.name, Level: o.level, FrameBlocks: o.frameBlocks, SignKey: key, IndexCache: o.cacheDir(),
	})
	if err != nil {
		return err
	}
	signed := ""
	if key != nil {
		signed = ", signed"
	}
	fmt.Fprintf(c.Stdout, "%s: published %s %x to %s: %d of %d blocks new, uploaded %s = %d B in %d objects (pack %d B, index %d B, recipes %d B, %d deltas)%s, in %s\n",
		args[0], o.name, st.Digest[:8], t, st.NewBlocks, st.Blocks, units.Bytes(st.UploadedBytes), st.UploadedBytes, st.Objects,
		st.PackBytes, st.IndexBytes, st.RecipeBytes, st.Deltas, signed, time.Since(start).Round(time.Millisecond))
	return nil
}

// check checks the flags of a publish of an image.
func (o *publishOptions) check() error {
	if err := publish.ValidName(o.name); err != nil {
		return usageError{fmt.Errorf("--name: %w", err)}
	}
	if o.to == "" {
		return usagef("--to is required: file:///DIR or s3://BUCKET/PREFIX")
	}
	if o.level < 1 || o.level > 22 {
		return usagef("--compression-level %d: want 1 to 22", o.level)
	}
	if o.frameBlocks < 1 || o.frameBlocks > publish.MaxFrameBlocks {
		return usagef("--frame-blocks %d: want 1 to %d", o.frameBlocks, publish.MaxFrameBlocks)
	}
	return nil
}

// cacheDir is the pack index cache --index-cache names: "none" for none,
// by default one in the user's cache directory.
func (o *publishOptions) cacheDir() string {
	switch o.indexCache {
	case "none":
		return ""
	case "":
		if d, err := os.UserCacheDir(); err == nil {
			return filepath.Join(d, "nixvm-image", "packs")
		}
		return ""
	}
	return o.indexCache
}
