package main

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/nixvm-image/nixvm-image/internal/units"
	"github.com/nixvm-image/nixvm-image/store"
	"github.com/spf13/pflag"
)

type gcOptions struct {
	Keep     int
	DryRun   bool
	Names    []string
	Scan     []string
	Pools    []string
	Domains  bool
	StoreDir string
	Connect  string
}

func (o *gcOptions) AddFlags(fs *pflag.FlagSet) {
	fs.IntVar(&o.Keep, "keep", -1, "keep this many newest generations per name, the current one included (required)")
	fs.BoolVarP(&o.DryRun, "dry-run", "n", false, "print what would be removed, remove nothing")
	fs.StringArrayVar(&o.Names, "name", nil, "only this image name (repeatable; default all)")
	fs.StringArrayVar(&o.Scan, "scan", nil, "a directory to search for disks and links that use generations (repeatable)")
	fs.StringArrayVar(&o.Pools, "pool", nil, "a libvirt pool whose volumes to check (repeatable)")
	fs.BoolVar(&o.Domains, "domains", false, "also check every disk of every libvirt domain")
	fs.StringVar(&o.StoreDir, "store-dir", store.DefaultDir, "the image store")
	fs.StringVarP(&o.Connect, "connect", "c", "", "libvirt URI for virsh")
}

func init() {
	register(&command{
		name:    "gc",
		summary: "remove old image generations that no guest disk uses",
		usage:   "--keep N [--scan DIR]... [--pool POOL]... [--domains] [--dry-run]",
		help: `Keeps, for each image name (or each --name), the N newest generations
counting the current one, the current one always, and every generation a
disk it finds uses: a qcow2 whose backing chain reaches it, or a symlink to
it (such as the compatibility link /etc/virt/base-images/baseline.qcow2).
It looks for disks only where it is told: --scan directories (recursively),
the volumes of --pool libvirt pools, and with --domains every disk of every
libvirt domain. A disk it is not told about does not protect its base.
It takes each name's store lock, so it never runs beside a push to it or
beside a provision making a disk from it (it skips such a busy name and says
so), and removes what crashes left there: partial receives no push touched for a day
(or of a generation the store holds), indexes whose image is gone, images
without an index that no disk found uses, and temporary files.

Examples:
  nixvm-image gc --keep 2 --scan /var/lib/libvirt/images --dry-run
  nixvm-image gc --keep 1 --pool guests --domains --scan /etc/virt/base-images`,
		setup: func(fs *pflag.FlagSet) func(context.Context, Context, []string) error {
			o := &gcOptions{}
			o.AddFlags(fs)
			return func(ctx context.Context, c Context, args []string) error { return runGC(ctx, o, c, args) }
		},
	})
}

func runGC(ctx context.Context, o *gcOptions, c Context, args []string) error {
	if len(args) > 0 {
		return usagef("unexpected arguments %q", args)
	}
	opts, err := o.gcOpts()
	if err != nil {
		return err
	}
	rep, err := (&store.Store{Dir: o.StoreDir}).GC(ctx, opts)
	if perr := o.report(c, rep); err == nil {
		err = perr
	}
	return err
}

// gcOpts turns the flags into the store's GC options.
func (o *gcOptions) gcOpts() (store.GCOptions, error) {
	opts := store.GCOptions{Names: o.Names, Keep: o.Keep, ScanDirs: o.Scan, DryRun: o.DryRun}
	if o.Keep < 0 {
		return opts, usagef("--keep N is required (N >= 0; the current generation is always kept)")
	}
	for _, n := range o.Names {
		if err := store.ValidName(n); err != nil {
			return opts, usageError{fmt.Errorf("--name: %w", err)}
		}
	}
	if len(o.Pools) > 0 || o.Domains {
		v := findVirsh(o.Connect)
		if v == nil {
			return opts, fmt.Errorf("--pool and --domains need virsh (libvirt's client), which is not installed here")
		}
		opts.Disks = v.Disks(o.Pools, o.Domains)
	}
	return opts, nil
}

// report prints one line per generation and a summary.
func (o *gcOptions) report(c Context, rep *store.GCReport) error {
	ds := rep.Decisions
	tw := tabwriter.NewWriter(c.Stdout, 0, 4, 2, ' ', 0)
	var removed, freed int64
	for _, d := range ds {
		action, why := "keep", d.Reason
		if d.Remove {
			action, why = "remove", ""
			if o.DryRun {
				action = "would remove"
			}
			removed++
			freed += d.Gen.VirtualSize
		} else if len(d.Users) > 0 {
			why += fmt.Sprintf(" by %s", d.Users[0])
			if len(d.Users) > 1 {
				why += fmt.Sprintf(" and %d more", len(d.Users)-1)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", action, d.Gen.Path, why)
	}
	verb, action := "removed", "remove"
	if o.DryRun {
		verb, action = "would remove", "would remove"
	}
	var junkBytes int64
	for _, j := range rep.Junk {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", action, j.Path, j.Why)
		junkBytes += j.Bytes
	}
	for _, sk := range rep.Skipped {
		fmt.Fprintf(tw, "skip\t%s\t%v\n", sk.Name, sk.Err)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	leftovers := ""
	if len(rep.Junk) > 0 {
		leftovers = fmt.Sprintf(", and %d leftovers (%s)", len(rep.Junk), units.Bytes(junkBytes))
	}
	if len(rep.Skipped) > 0 {
		leftovers += fmt.Sprintf("; skipped %d busy names (run gc again later)", len(rep.Skipped))
	}
	_, err := fmt.Fprintf(c.Stdout, "%s %d of %d generations (%s virtual)%s\n", verb, removed, len(ds), units.Bytes(freed), leftovers)
	return err
}
