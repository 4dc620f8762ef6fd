package testutil

import (
	"bytes"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// AttachLoop attaches image to a free loop device, starting offset bytes into
// the file and size bytes long (size <= 0: to the end of the file), and
// returns the device, e.g. /dev/loop3. The device is detached when the test
// ends. This kernel parses no partition tables on loop devices, so attach a
// partition by its offset and size. Needs root and losetup.
func AttachLoop(t testing.TB, image string, offset, size int64) string {
	t.Helper()
	NeedRoot(t)
	losetup := NeedTool(t, "losetup")[0]
	args := []string{"--show", "--find", "--offset", strconv.FormatInt(offset, 10)}
	if size > 0 {
		args = append(args, "--sizelimit", strconv.FormatInt(size, 10))
	}
	args = append(args, image)
	out, err := runTool(losetup, args...)
	if err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/") {
		t.Fatalf("losetup %s: got %q, want a device", strings.Join(args, " "), dev)
	}
	t.Cleanup(func() {
		// A mount released a moment ago may still hold the device.
		var err error
		for range 20 {
			if _, err = runTool(losetup, "--detach", dev); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("detaching %s: %v", dev, err)
	})
	return dev
}

// Mount mounts dev on dir with the given -o options (none: the kernel's
// defaults), and unmounts it when the test ends. Cleanups run last-in
// first-out, so a Mount after AttachLoop is unmounted before the detach.
// Needs root and mount.
func Mount(t testing.TB, dev, dir string, opts ...string) {
	t.Helper()
	NeedRoot(t)
	tools := NeedTool(t, "mount", "umount")
	args := []string{}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	args = append(args, dev, dir)
	if _, err := runTool(tools[0], args...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var err error
		for range 20 {
			if _, err = runTool(tools[1], dir); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("unmounting %s: %v", dir, err)
	})
}

// runTool runs a program and returns its stdout; its error carries the argv
// and stderr.
func runTool(name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, &ToolError{Argv: append([]string{name}, args...), Stderr: stderr.String(), Err: err}
	}
	return out, nil
}

// ToolError is the failure of a program a test helper ran.
type ToolError struct {
	Argv   []string
	Stderr string
	Err    error
}

func (e *ToolError) Error() string {
	return strings.Join(e.Argv, " ") + ": " + e.Err.Error() + ": " + strings.TrimSpace(e.Stderr)
}

func (e *ToolError) Unwrap() error { return e.Err }
