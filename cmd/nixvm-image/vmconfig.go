package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/nixvm-image/nixvm-image/internal/shquote"
	nixmodule "github.com/nixvm-image/nixvm-image/nix"
	"github.com/nixvm-image/nixvm-image/partition"
)

// nixCommand returns the argv that builds the system of a NixOS configuration
// with the user's own Nix, adding guest.nix (at module) with nixvm.layout set.
// config is CONFIG.nix (evaluated through '<nixpkgs/nixos>' on the user's
// NIX_PATH), flake is FLAKE#NAME (nixosConfigurations.NAME, extended with
// extendModules). The result is the out-link outLink.
func nixCommand(config, flake, module string, layout partition.Layout, outLink string) ([]string, error) {
	layoutModule := fmt.Sprintf("{ nixvm.layout = %q; }", string(layout))
	if config != "" {
		abs, err := filepath.Abs(config)
		if err != nil {
			return nil, err
		}
		return []string{"nix-build", "<nixpkgs/nixos>", "-A", "system",
			"--arg", "configuration", fmt.Sprintf("{ imports = [ %s %s %s ]; }", nixPath(abs), nixPath(module), layoutModule),
			"--out-link", outLink}, nil
	}
	ref, name, ok := strings.Cut(flake, "#")
	if !ok || ref == "" || name == "" {
		return nil, usagef("--flake %q: want FLAKE#NAME, e.g. .#baseline (nixosConfigurations.baseline)", flake)
	}
	if !strings.Contains(ref, ":") {
		// A path: builtins.getFlake wants it absolute.
		abs, err := filepath.Abs(ref)
		if err != nil {
			return nil, err
		}
		ref = "path:" + abs
	}
	expr := fmt.Sprintf(`let f = builtins.getFlake %q; in (f.nixosConfigurations.%q.extendModules { modules = [ %s %s ]; }).config.system.build.toplevel`,
		ref, name, nixPath(module), layoutModule)
	return []string{"nix", "--extra-experimental-features", "nix-command flakes",
		"build", "--impure", "--expr", expr, "--out-link", outLink}, nil
}

// nixPath writes an absolute path as a Nix path literal.
func nixPath(p string) string {
	if strings.ContainsAny(p, " \"'$\\{}") {
		return fmt.Sprintf("(/. + %q)", p)
	}
	return p
}

// buildSystem builds a NixOS configuration and returns its system path. The
// out-link (a GC root while the image is built) is removed by cleanup.
func buildSystem(ctx context.Context, config, flake string, layout partition.Layout, log io.Writer) (string, func(), error) {
	if config != "" {
		if _, err := os.Stat(config); err != nil {
			return "", nil, usagef("CONFIG.nix: %v", err)
		}
	}
	dir, err := os.MkdirTemp("", "nixvm-image-eval-")
	if err != nil {
		return "", nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	module := filepath.Join(dir, "nixvm-guest.nix")
	if err := os.WriteFile(module, nixmodule.GuestModule, 0o644); err != nil {
		cleanup()
		return "", nil, err
	}
	outLink := filepath.Join(dir, "result")
	argv, err := nixCommand(config, flake, module, layout, outLink)
	if err != nil {
		cleanup()
		return "", nil, err
	}
	if log != nil {
		fmt.Fprintf(log, "evaluating and building the system: %s\n", shquote.Join(argv))
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stdout = io.Discard
	if log != nil {
		cmd.Stderr = io.MultiWriter(&stderr, prefixWriter(log, "nix: "))
	} else {
		cmd.Stderr = &stderr
	}
	if err := cmd.Run(); err != nil {
		cleanup()
		msg := stderr.String()
		if len(msg) > 4000 {
			msg = "..." + msg[len(msg)-4000:]
		}
		hint := ""
		if strings.Contains(msg, "nixpkgs/nixos") && strings.Contains(msg, "not found") {
			hint = "\nnix-build cannot find <nixpkgs/nixos>: set NIX_PATH (e.g. NIX_PATH=nixpkgs=/path/to/nixpkgs), or use --flake"
		}
		return "", nil, fmt.Errorf("%s: %w\n%s%s", shquote.Join(argv), err, strings.TrimSpace(msg), hint)
	}
	top, err := os.Readlink(outLink)
	if err != nil {
		cleanup()
		return "", nil, fmt.Errorf("%s made no out-link: %w", argv[0], err)
	}
	return top, cleanup, nil
}

// prefixWriter prefixes every line written to w.
func prefixWriter(w io.Writer, prefix string) io.Writer {
	atStart := true
	return writerFunc(func(b []byte) (int, error) {
		var out bytes.Buffer
		for _, c := range b {
			if atStart {
				out.WriteString(prefix)
				atStart = false
			}
			out.WriteByte(c)
			if c == '\n' {
				atStart = true
			}
		}
		if _, err := w.Write(out.Bytes()); err != nil {
			return 0, err
		}
		return len(b), nil
	})
}
