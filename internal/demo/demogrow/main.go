// Command demogrow is scripts/demo-grow's engine (see package demo): it
// copies a built image onto a disk FACTOR times larger, boots a QEMU TCG
// guest that runs df -h, nixvm-resize and df -h on the image's root file
// system, and prints what the guest printed.
//
//	go run ./internal/demo/demogrow -image demo/demo.qcow2 -o demo/demo-grown.qcow2 -resize bin/nixvm-resize
//
// Exit status: 0 when the guest grew the file system, 1 on an error, 2 on a
// usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/demo"
	"github.com/nixvm-image/nixvm-image/internal/shquote"
	"github.com/nixvm-image/nixvm-image/internal/units"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demogrow", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opts demo.GrowOptions
	fs.StringVar(&opts.Image, "image", "demo/demo.qcow2", "the built image")
	fs.StringVar(&opts.Output, "o", "", "the grown qcow2 to write (default: IMAGE with -grown.qcow2)")
	fs.StringVar(&opts.Resize, "resize", "bin/nixvm-resize", "static nixvm-resize binary (make build)")
	fs.Int64Var(&opts.Factor, "factor", 4, "grow the disk to FACTOR times the image's virtual size")
	fs.StringVar(&opts.Kernel, "kernel", "", "guest kernel (default: the newest /boot/vmlinuz-* with modules)")
	fs.DurationVar(&opts.Timeout, "timeout", 5*time.Minute, "guest timeout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(stderr, "demogrow: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if opts.Output == "" {
		opts.Output = trimExt(opts.Image) + "-grown.qcow2"
	}
	opts.Command = func(argv []string) { fmt.Fprintf(stdout, "$ %s\n", shquote.Join(argv)) }
	fmt.Fprintf(stdout, "== copy %s onto a disk %dx its size, boot a QEMU TCG guest (Debian kernel, busybox initramfs with nixvm-resize)\n", opts.Image, opts.Factor)
	start := time.Now()
	res, err := demo.Grow(context.Background(), opts)
	if res != nil && res.Transcript != "" {
		fmt.Fprintf(stdout, "== the guest (%s):\n%s", time.Since(start).Round(time.Second), res.Transcript)
	}
	if err != nil {
		if res != nil && res.Serial != "" {
			fmt.Fprintf(stderr, "serial output:\n%s\n", res.Serial)
		}
		fmt.Fprintf(stderr, "demogrow: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "== disk %s -> %s; root file system %s -> %s (df); grown image: %s\n",
		units.Bytes(res.BuiltSize), units.Bytes(res.GrownSize), units.Bytes(res.BeforeKiB<<10), units.Bytes(res.AfterKiB<<10), opts.Output)
	return 0
}

func trimExt(p string) string {
	for i := len(p) - 1; i >= 0 && p[i] != '/'; i-- {
		if p[i] == '.' {
			return p[:i]
		}
	}
	return p
}
