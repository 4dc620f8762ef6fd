package nixclosure

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// FromToplevel returns the closure of a store path from the local Nix store:
// `nix-store --query --requisites TOPLEVEL`, then `nix-store --dump-db` of
// those paths for hashes, sizes, derivers and references. Errors carry the
// argv and stderr of the failing command.
func FromToplevel(ctx context.Context, toplevel string) (*Closure, error) {
	out, err := runNix(ctx, "nix-store", "--query", "--requisites", toplevel)
	if err != nil {
		return nil, err
	}
	paths := strings.Fields(string(out))
	if len(paths) == 0 {
		return nil, fmt.Errorf("%w: nix-store --query --requisites %s printed no paths", ErrMalformed, toplevel)
	}
	db, err := runNix(ctx, "nix-store", append([]string{"--dump-db"}, paths...)...)
	if err != nil {
		return nil, err
	}
	c, err := parseLines(db, "nix-store --dump-db", true)
	if err != nil {
		return nil, err
	}
	if len(c.Paths) != len(paths) {
		return nil, fmt.Errorf("%w: nix-store --dump-db: got %d paths, want %d", ErrMalformed, len(c.Paths), len(paths))
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("closure of %s: %w", toplevel, err)
	}
	return c, nil
}

func runNix(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		argv := strings.Join(cmd.Args, " ")
		if len(argv) > 300 {
			argv = argv[:300] + "..."
		}
		return nil, fmt.Errorf("%s: %w: %s", argv, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
