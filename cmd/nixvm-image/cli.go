package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/spf13/pflag"

	"github.com/nixvm-image/nixvm-image/internal/version"
)

// Exit codes, documented in every --help.
const (
	exitOK    = 0
	exitError = 1 // the command failed; the message says why and what to do
	exitUsage = 2 // bad flags or arguments
)

const exitStatusHelp = `
EXIT STATUS
  0  success
  1  the command failed (the message names the input and the fix)
  2  bad flags or arguments
`

// Context is one invocation of the CLI. Tests run the real CLI in-process by
// filling it with buffers instead of building a binary.
type Context struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	Args   []string
}

// command is one subcommand. newFlags returns a fresh options value bound to
// a flag set, and run executes it; no flag lives in a package variable.
type command struct {
	name    string
	summary string
	usage   string // after "nixvm-image NAME "
	help    string // longer text printed by --help, before the flags
	// setup binds the options to fs and returns the function that runs them.
	setup func(fs *pflag.FlagSet) func(ctx context.Context, c Context, args []string) error
}

// commands is filled by init functions in the subcommand files.
var commands = map[string]*command{}

func register(c *command) { commands[c.name] = c }

// usageError marks errors caused by bad flags or arguments (exit 2).
type usageError struct{ error }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// Execute runs the command line and returns the process exit code.
func (c Context) Execute(ctx context.Context) int {
	if c.Stdin == nil {
		c.Stdin = strings.NewReader("")
	}
	if len(c.Args) == 1 && c.Args[0] == "--version" {
		fmt.Fprintln(c.Stdout, version.String("nixvm-image"))
		return exitOK
	}
	if len(c.Args) == 0 || c.Args[0] == "-h" || c.Args[0] == "--help" || c.Args[0] == "help" {
		if len(c.Args) > 1 {
			if cmd, ok := commands[c.Args[1]]; ok {
				return c.runCommand(ctx, cmd, []string{"--help"})
			}
		}
		c.printUsage(c.Stdout)
		if len(c.Args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	cmd, ok := commands[c.Args[0]]
	if !ok {
		fmt.Fprintf(c.Stderr, "nixvm-image: unknown command %q\n\n", c.Args[0])
		c.printUsage(c.Stderr)
		return exitUsage
	}
	return c.runCommand(ctx, cmd, c.Args[1:])
}

func (c Context) runCommand(ctx context.Context, cmd *command, args []string) int {
	fs := pflag.NewFlagSet("nixvm-image "+cmd.name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	run := cmd.setup(fs)
	fs.SortFlags = false
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			c.printCommandHelp(c.Stdout, cmd, fs)
			return exitOK
		}
		fmt.Fprintf(c.Stderr, "nixvm-image %s: %v\nRun 'nixvm-image %s --help' for usage.\n", cmd.name, err, cmd.name)
		return exitUsage
	}
	err := run(ctx, c, fs.Args())
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(c.Stderr, "nixvm-image %s: %v\n", cmd.name, err)
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(c.Stderr, "Run 'nixvm-image %s --help' for usage.\n", cmd.name)
		return exitUsage
	}
	return exitError
}

func (c Context) printUsage(w io.Writer) {
	fmt.Fprintf(w, "nixvm-image builds deterministic NixOS disk images from Nix closures and ships them to libvirt hosts.\n\nUsage:\n  nixvm-image COMMAND [flags] [args]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, "\nRun 'nixvm-image COMMAND --help' for a command's flags and examples.\n%s", exitStatusHelp)
}

func (c Context) printCommandHelp(w io.Writer, cmd *command, fs *pflag.FlagSet) {
	fmt.Fprintf(w, "Usage: nixvm-image %s %s\n\n%s\n", cmd.name, cmd.usage, strings.TrimSpace(cmd.summary))
	if cmd.help != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimRight(cmd.help, "\n"))
	}
	fmt.Fprintf(w, "\nFlags:\n%s%s", fs.FlagUsages(), exitStatusHelp)
}

// isTerminal reports whether w is a terminal (progress bars only there).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
