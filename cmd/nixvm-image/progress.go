package main

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/nixvm-image/nixvm-image/internal/units"
)

// progress shows the phases of a long job: a bar on a terminal, a plain line
// every few seconds otherwise.
type progress struct {
	mu       sync.Mutex
	w        io.Writer
	terminal bool
	bar      *progressbar.ProgressBar
	name     string
	total    int64
	done     int64
	last     time.Time
	interval time.Duration
}

func newProgress(w io.Writer, terminal bool) *progress {
	return &progress{w: w, terminal: terminal, interval: 5 * time.Second}
}

func (p *progress) Phase(name string, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeBar()
	p.name, p.total, p.done, p.last = name, total, 0, time.Now()
	if p.terminal {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription(name),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
}

func (p *progress) Add(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	if p.bar != nil {
		p.bar.Add64(n)
		return
	}
	if now := time.Now(); now.Sub(p.last) >= p.interval {
		p.last = now
		pct := 0.0
		if p.total > 0 {
			pct = 100 * float64(p.done) / float64(p.total)
		}
		fmt.Fprintf(p.w, "%s: %s of %s (%.0f%%)\n", p.name, units.Bytes(p.done), units.Bytes(p.total), pct)
	}
}

func (p *progress) closeBar() {
	if p.bar != nil {
		p.bar.Finish()
		p.bar = nil
	}
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeBar()
}

// logWriter returns the writer for step lines: they clear a bar first so
// the two do not mix. nil w discards.
func logWriter(w io.Writer, p *progress) io.Writer {
	if w == nil {
		return io.Discard
	}
	if p == nil || !p.terminal {
		return w
	}
	return writerFunc(func(b []byte) (int, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.bar != nil {
			p.bar.Clear()
		}
		return w.Write(b)
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
