package main

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"
)

// nixOptions are the flags that reach Nix when build evaluates CONFIG.nix or
// --flake, and --out-link and --nixvm-resize, which say what the build keeps
// and adds. Nix's two-word flags (--arg NAME EXPR) take one word here,
// NAME=EXPR.
type nixOptions struct {
	include   []string // -I PATH
	args      []string // --arg NAME=EXPR
	argstrs   []string // --argstr NAME=VALUE
	options   []string // --option NAME=VALUE
	showTrace bool
	impure    bool
	outLink   string
	resize    string
}

func (o *nixOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringArrayVarP(&o.include, "include", "I", nil, "`PATH` for Nix's search path, e.g. -I nixpkgs=/src/nixpkgs (nix -I); repeatable")
	fs.StringArrayVar(&o.args, "arg", nil, "`NAME=EXPR`, nix's --arg NAME EXPR as one word: an argument of <nixpkgs/nixos> for CONFIG.nix, e.g. --arg 'system=\"aarch64-linux\"'; repeatable")
	fs.StringArrayVar(&o.argstrs, "argstr", nil, "`NAME=VALUE`, nix's --argstr NAME VALUE as one word, e.g. --argstr system=aarch64-linux; repeatable")
	fs.StringArrayVar(&o.options, "option", nil, "`NAME=VALUE`, nix's --option NAME VALUE as one word, e.g. --option max-jobs=4; repeatable")
	fs.BoolVar(&o.showTrace, "show-trace", false, "nix --show-trace: show the evaluation's trace on errors")
	fs.BoolVar(&o.impure, "impure", false, "nix --impure for CONFIG.nix (a --flake is always evaluated with --impure: the build adds its module to it)")
	fs.StringVar(&o.outLink, "out-link", "", "keep the built system: a GC root at `PATH` (nix-build --out-link); default: removed after the build")
	fs.StringVar(&o.resize, "nixvm-resize", "", "static nixvm-resize `FILE` for the first-boot unit when the configuration sets no nixvm.resize.package (default: the nixvm-resize beside this executable)")
}

// passThrough returns the validated Nix flags, in a fixed order: -I, --arg,
// --argstr, --option, --show-trace, --impure. flake drops what a flake
// cannot take: --arg and --argstr (a flake has no arguments) are refused,
// --impure is already there.
func (o *nixOptions) passThrough(flake bool) ([]string, error) {
	var out []string
	for _, p := range o.include {
		if p == "" {
			return nil, usagef("-I: empty path; want PATH or NAME=PATH")
		}
		out = append(out, "-I", p)
	}
	pairs := func(flag string, vals []string) error {
		for _, v := range vals {
			name, value, ok := strings.Cut(v, "=")
			if !ok || name == "" {
				return usagef("--%s %q: want NAME=VALUE (nix's --%s NAME VALUE as one word)", flag, v, flag)
			}
			if flag != "option" && flake {
				return usagef("--%s %s: a flake takes no arguments; --%s applies to CONFIG.nix", flag, name, flag)
			}
			if flag != "option" && name == "configuration" {
				return usagef("--%s configuration: the build passes the configuration itself (CONFIG.nix with the guest module)", flag)
			}
			out = append(out, "--"+flag, name, value)
		}
		return nil
	}
	if err := pairs("arg", o.args); err != nil {
		return nil, err
	}
	if err := pairs("argstr", o.argstrs); err != nil {
		return nil, err
	}
	if err := pairs("option", o.options); err != nil {
		return nil, err
	}
	if o.showTrace {
		out = append(out, "--show-trace")
	}
	if o.impure && !flake {
		out = append(out, "--impure")
	}
	return out, nil
}

// keptOutLink returns --out-link as an absolute path, or "" without it.
func (o *nixOptions) keptOutLink() (string, error) {
	if o.outLink == "" {
		return "", nil
	}
	abs, err := filepath.Abs(o.outLink)
	if err != nil {
		return "", fmt.Errorf("--out-link: %w", err)
	}
	return abs, nil
}
