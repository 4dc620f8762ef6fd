package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type imagesOptions struct {
	remoteOptions
	Name string
}

func (o *imagesOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Name, "name", "", "only this image name")
	o.remoteOptions.AddFlags(fs)
}

func init() {
	register(&command{
		name:    "images",
		summary: "list the image generations a host (or this machine) holds",
		usage:   "[HOST] [--name NAME] [flags]",
		help: `Without HOST, lists this machine's store (--store-dir); with HOST, asks
that host over ssh, like push does.

Examples:
  nixvm-image images
  nixvm-image images athens --name baseline`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &imagesOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runImages(ctx, o, c, args) }
		},
	})
}

func runImages(ctx context.Context, o *imagesOptions, c Context, args []string) error {
	if len(args) > 1 {
		return usagef("at most one HOST, got %d", len(args))
	}
	if o.Name != "" {
		if err := store.ValidName(o.Name); err != nil {
			return usageError{fmt.Errorf("--name: %w", err)}
		}
	}
	var gens []store.Generation
	var err error
	if len(args) == 0 {
		gens, err = localGenerations(&store.Store{Dir: o.StoreDir}, o.Name)
	} else {
		err = o.remoteSession(ctx, args[0], func(conn io.ReadWriter) error {
			var lerr error
			gens, lerr = push.List(ctx, conn, o.Name)
			return lerr
		})
	}
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(c.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCURRENT\tDIGEST\tSIZE\tPATH")
	for _, g := range gens {
		cur := ""
		if g.Current {
			cur = "*"
		}
		fmt.Fprintf(tw, "%s\t%s\t%x\t%s\t%s\n", g.Name, cur, g.Digest[:8], units.Bytes(g.VirtualSize), g.Path)
	}
	return tw.Flush()
}

// localGenerations lists the generations of name, or of every name when
// name is "", in st.
func localGenerations(st *store.Store, name string) ([]store.Generation, error) {
	names := []string{name}
	if name == "" {
		var err error
		if names, err = st.Names(); err != nil {
			return nil, err
		}
	}
	var gens []store.Generation
	for _, n := range names {
		g, err := st.List(n)
		if err != nil {
			return nil, err
		}
		gens = append(gens, g...)
	}
	return gens, nil
}
