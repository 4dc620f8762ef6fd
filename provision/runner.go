package provision

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"strings"
)

// Runner runs argv and returns its standard output. Its error must carry the
// argv and standard error (ExecRunner returns a *ToolError).
type Runner func(ctx context.Context, argv []string) ([]byte, error)

// ToolError is the failure of a program a Runner ran.
type ToolError struct {
	Argv   []string
	Stderr string
	Err    error
}

func (e *ToolError) Error() string {
	msg := strings.Join(e.Argv, " ") + ": " + e.Err.Error()
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + s
	}
	return msg
}

func (e *ToolError) Unwrap() error { return e.Err }

// ExecRunner runs argv as a child process.
func ExecRunner(ctx context.Context, argv []string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, &ToolError{Argv: argv, Stderr: stderr.String(), Err: err}
	}
	return out, nil
}

func (r Runner) run(ctx context.Context, argv ...string) ([]byte, error) {
	if r == nil {
		return ExecRunner(ctx, argv)
	}
	return r(ctx, argv)
}

// stderrOf returns the standard error carried by err, if any.
func stderrOf(err error) string {
	var te *ToolError
	if errors.As(err, &te) {
		return te.Stderr
	}
	return err.Error()
}
