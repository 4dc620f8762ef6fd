package main

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixvm-image/nixvm-image/internal/units"
)

// The one progress renderer of the CLI. A job describes its progress as
// lines (a build: its current phase; a push: one line per host), and the
// renderer draws them: redrawn in place every 200 ms on a terminal, printed
// every 5 s otherwise (a log, CI), nothing with --quiet (the job starts no
// renderer). Step lines written through logWriter clear the drawn lines
// first, so the two do not mix.

// Redraw intervals.
const (
	terminalInterval = 200 * time.Millisecond
	plainInterval    = 5 * time.Second
)

// progressLine formats one line: the name, a bar and a percentage when the
// total is known (> 0), the bytes done (of the total), and a note.
func progressLine(name string, done, total int64, note string) string {
	s := fmt.Sprintf("%-12s ", name)
	if total > 0 {
		frac := min(max(float64(done)/float64(total), 0), 1)
		const width = 30
		n := int(frac * width)
		s += "[" + strings.Repeat("=", n) + strings.Repeat(" ", width-n) + fmt.Sprintf("] %3.0f%% ", 100*frac)
	}
	s += units.Bytes(done)
	if total > 0 {
		s += " of " + units.Bytes(total)
	}
	if note != "" {
		s += ", " + note
	}
	return s
}

// renderer draws the lines that lines returns until stop.
type renderer struct {
	mu       sync.Mutex
	w        io.Writer
	terminal bool
	lines    func() []string
	drawn    int // lines drawn on the terminal since the last clear
	quit     chan struct{}
	wg       sync.WaitGroup
	once     sync.Once
}

// startRenderer returns a renderer that draws until stop.
func startRenderer(w io.Writer, terminal bool, lines func() []string) *renderer {
	return newRenderer(w, terminal, lines).start()
}

// newRenderer returns a renderer that draws only when told to (draw, stop).
func newRenderer(w io.Writer, terminal bool, lines func() []string) *renderer {
	return &renderer{w: w, terminal: terminal, lines: lines, quit: make(chan struct{})}
}

// start draws on every tick until stop.
func (r *renderer) start() *renderer {
	every := plainInterval
	if r.terminal {
		every = terminalInterval
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-r.quit:
				return
			case <-t.C:
				r.draw()
			}
		}
	}()
	return r
}

// draw writes the lines: over the ones drawn before on a terminal.
func (r *renderer) draw() {
	r.mu.Lock()
	defer r.mu.Unlock()
	lines := r.lines()
	var b bytes.Buffer
	if r.terminal {
		r.clearTo(&b)
		for _, l := range lines {
			fmt.Fprintf(&b, "\r\x1b[2K%s\n", l)
		}
		r.drawn = len(lines)
	} else {
		for _, l := range lines {
			fmt.Fprintf(&b, "%s\n", l)
		}
	}
	r.w.Write(b.Bytes()) // progress is best effort: a failing stderr fails nothing
}

// clearTo appends what erases the drawn lines to b (r.mu held).
func (r *renderer) clearTo(b *bytes.Buffer) {
	if r.drawn > 0 {
		fmt.Fprintf(b, "\x1b[%dA\x1b[J", r.drawn)
		r.drawn = 0
	}
}

// write writes p to w (a step line) after erasing the drawn lines, which
// the next tick draws again below it.
func (r *renderer) write(w io.Writer, p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b bytes.Buffer
	r.clearTo(&b)
	if b.Len() > 0 {
		r.w.Write(b.Bytes())
	}
	return w.Write(p)
}

// stop stops drawing; on a terminal it draws the final state once more.
func (r *renderer) stop() {
	r.once.Do(func() {
		close(r.quit)
		r.wg.Wait()
		if r.terminal {
			r.draw()
		}
	})
}

// progress shows the phases of a long job, one line: it is the
// imagebuild.Progress of a build and the copy progress of provision.
type progress struct {
	mu    sync.Mutex
	name  string
	total int64
	done  atomic.Int64
	r     *renderer
}

func newProgress(w io.Writer, terminal bool) *progress {
	p := &progress{}
	p.r = startRenderer(w, terminal, p.lines)
	return p
}

// Phase starts a phase of total bytes.
func (p *progress) Phase(name string, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.name, p.total = name, total
	p.done.Store(0)
}

// Add reports n more bytes done.
func (p *progress) Add(n int64) { p.done.Add(n) }

func (p *progress) lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.name == "" {
		return nil
	}
	return []string{progressLine(p.name, p.done.Load(), p.total, "")}
}

// finish stops drawing; it may be called more than once.
func (p *progress) finish() { p.r.stop() }

// hostProgress is a push's progress: one line per host (or one "hashing"
// line), with the bytes sent.
type hostProgress struct {
	w     io.Writer
	quiet bool
	tty   bool
	names []string
	total []int64 // <= 0: unknown
	done  []atomic.Int64
	sent  []atomic.Int64
}

func newHostProgress(w io.Writer, quiet bool, names []string) *hostProgress {
	return &hostProgress{w: w, quiet: quiet, tty: isTerminal(w), names: names,
		total: make([]int64, len(names)), done: make([]atomic.Int64, len(names)),
		sent: make([]atomic.Int64, len(names))}
}

// run starts drawing, calling poll (if not nil) before each draw; the
// returned function stops and, on a terminal, draws a last time.
func (p *hostProgress) run(poll func()) func() {
	if p.quiet {
		return func() {}
	}
	r := startRenderer(p.w, p.tty, func() []string {
		if poll != nil {
			poll()
		}
		lines := make([]string, len(p.names))
		for i, name := range p.names {
			note := ""
			if sent := p.sent[i].Load(); sent > 0 {
				note = "sent " + units.Bytes(sent)
			}
			lines[i] = progressLine(name, p.done[i].Load(), p.total[i], note)
		}
		return lines
	})
	return r.stop
}

// logWriter returns the writer for step lines: on a terminal they erase
// the progress lines first. nil w discards.
func logWriter(w io.Writer, p *progress) io.Writer {
	if w == nil {
		return io.Discard
	}
	if p == nil || !p.r.terminal {
		return w
	}
	return writerFunc(func(b []byte) (int, error) { return p.r.write(w, b) })
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
