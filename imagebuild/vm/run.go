package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// outcome is what one boot reported.
type outcome struct {
	started bool   // the start marker arrived
	exit    int    // valid when exited
	exited  bool   // the exit marker arrived
	errMsg  string // the error marker's message
	tail    []string
}

// tailLines is how much guest output an error carries.
const tailLines = 40

// console reads the guest's serial output: it records the markers and the
// last lines in out and copies the other lines to log, prefixed.
type console struct {
	mu      sync.Mutex
	out     outcome
	log     io.Writer
	started chan struct{} // closed when the start marker arrives
}

func (c *console) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		c.line(stripControl(strings.TrimRight(sc.Text(), "\r")))
	}
	io.Copy(io.Discard, r)
}

func (c *console) line(line string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := &c.out
	switch {
	case strings.Contains(line, markerStart):
		if !out.started {
			out.started = true
			close(c.started)
		}
	case strings.Contains(line, markerExit):
		v := strings.TrimSpace(line[strings.Index(line, markerExit)+len(markerExit):])
		if n, err := strconv.Atoi(v); err == nil {
			out.exit, out.exited = n, true
		}
	case strings.Contains(line, markerError):
		out.errMsg = strings.TrimSpace(line[strings.Index(line, markerError)+len(markerError):])
	case strings.TrimSpace(line) != "":
		out.tail = append(out.tail, line)
		if len(out.tail) > tailLines {
			out.tail = out.tail[1:]
		}
		if c.log != nil {
			fmt.Fprintf(c.log, "guest: %s\n", line)
		}
	}
}

// boot runs QEMU once. probe > 0 kills it when the start marker has not
// arrived after probe (errProbe). Guest output goes to log, prefixed.
func boot(parent context.Context, argv []string, log io.Writer, timeout, probe time.Duration) (*outcome, error) {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = pw
	cmd.Stdin = nil
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vm: start %s: %w", argv[0], err)
	}
	con := &console{log: log, started: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		con.read(pr)
	}()
	waitErr := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		pw.Close()
		waitErr <- err
	}()
	reason, err := watch(parent, cancel, waitErr, con.started, timeout, probe)
	<-done
	con.mu.Lock()
	defer con.mu.Unlock()
	out := con.out
	if reason != nil {
		return &out, reason
	}
	if err != nil && !out.exited && out.errMsg == "" {
		return &out, fmt.Errorf("vm: %s: %w", argv[0], err)
	}
	return &out, nil
}

// watch waits for QEMU to exit (its error is err) and kills it (cancel)
// when the start marker is late (errProbe), the guest runs out of time
// (ErrTimeout) or parent is done (its error): the reason it was killed.
func watch(parent context.Context, cancel func(), waitErr <-chan error, started <-chan struct{}, timeout, probe time.Duration) (reason, err error) {
	var probeC <-chan time.Time
	if probe > 0 {
		t := time.NewTimer(probe)
		defer t.Stop()
		probeC = t.C
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	parentDone := parent.Done()
	for {
		select {
		case err = <-waitErr:
			return reason, err
		case <-started:
			started = nil
			probeC = nil
		case <-probeC:
			reason = errProbe
			cancel()
			probeC = nil
		case <-timer.C:
			reason = ErrTimeout
			cancel()
		case <-parentDone:
			parentDone = nil
			if reason == nil {
				reason = parent.Err()
			}
			cancel()
		}
	}
}

var errProbe = errors.New("vm: KVM probe: no sign of the guest")

// stripControl removes terminal escape sequences (SeaBIOS and the kernel
// print some) so that prefixed lines stay readable.
func stripControl(s string) string {
	if !strings.ContainsAny(s, "\x1b\x00\x07\x08") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == 0x1b {
			// CSI: ESC [ params final
			if i+1 < len(s) && s[i+1] == '[' {
				j := i + 2
				for j < len(s) && (s[j] < 0x40 || s[j] > 0x7e) {
					j++
				}
				i = j
				continue
			}
			i++
			continue
		}
		if c < 0x20 && c != '\t' {
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// kvmUsable reports whether /dev/kvm can be opened for reading and writing.
func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
