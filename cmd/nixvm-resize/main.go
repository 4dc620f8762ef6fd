// Command nixvm-resize grows the partition under a mounted ext4 file system
// (by default "/") to the end of its disk and grows the file system online.
// A NixOS guest runs it from a oneshot unit at first boot; it is safe to run
// on every boot. See package resize for what it does and leaves alone.
//
// A unit that runs it (the image builder's NixOS module provides one):
//
//	[Unit]
//	DefaultDependencies=no
//	After=local-fs.target
//	Before=sysinit.target
//	ConditionPathIsReadWrite=/
//	[Service]
//	Type=oneshot
//	ExecStart=/run/current-system/sw/bin/nixvm-resize
//	# online ext4 growth needs CAP_SYS_RESOURCE; BLKPG needs CAP_SYS_ADMIN
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/nixvm-image/nixvm-image/internal/version"
	"github.com/nixvm-image/nixvm-image/resize"
)

// Exit codes, documented in -help.
const (
	exitOK        = 0
	exitError     = 1
	exitUsage     = 2
	exitLeftAlone = 3
)

const usageText = `Usage: nixvm-resize [flags]

Grow the partition holding the ext4 file system at --mountpoint to the end of
its disk (GPT or MBR), tell the kernel (BLKPG_RESIZE_PARTITION) and grow the
mounted file system (EXT4_IOC_RESIZE_FS). Each step is skipped when already
done: a second run changes nothing. One line per step goes to stdout.

Left alone, with a message and nothing written: root on device-mapper
(LVM/LUKS) or md, on a whole disk without a partition table, on a partition
that is not the last one, on a logical MBR partition, or not ext2/3/4.

Flags:
`

const exitText = `
EXIT STATUS
  0  grown, or nothing to do, or a setup left alone (without --strict)
  1  error (the message says which step failed; a rerun continues from there)
  2  bad usage
  3  a setup left alone, with --strict
`

type usageError struct{ error }

// leftAloneError is returned by run when --strict turns a left-alone setup
// into a failure.
type leftAloneError struct{ error }

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("nixvm-resize", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opts resize.Options
	var strict, showVersion bool
	fs.StringVar(&opts.Mountpoint, "mountpoint", "/", "mount point of the ext4 file system to grow")
	fs.BoolVar(&opts.DryRun, "dry-run", false, "print what would be done, write nothing")
	fs.BoolVar(&strict, "strict", false, "exit 3 instead of 0 when the setup is left alone")
	fs.BoolVar(&showVersion, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageText)
		fs.PrintDefaults()
		fmt.Fprint(fs.Output(), exitText)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if showVersion {
		fmt.Fprintln(stdout, version.String("nixvm-resize"))
		return nil
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q (use --mountpoint PATH)", fs.Arg(0))}
	}
	_, err := resize.Run(opts, stdout)
	if errors.Is(err, resize.ErrLeftAlone) {
		fmt.Fprintf(stdout, "%v; nothing touched\n", err)
		if strict {
			return leftAloneError{err}
		}
		return nil
	}
	return err
}

func exitCode(err error) int {
	var ue usageError
	var la leftAloneError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &la):
		return exitLeftAlone
	}
	return exitError
}

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(os.Stderr, "nixvm-resize: %v\n", err)
	}
	os.Exit(exitCode(err))
}
