package push

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// DefaultIdleTimeout is how long serve waits for the next frame (or for a
// write to the peer to go through) before it gives up on a stalled peer.
const DefaultIdleTimeout = 10 * time.Minute

// ErrIdle reports a peer that sent no frame (or read nothing) for the idle
// timeout. serve then ends as if the connection broke: the name's lock is
// released and the checkpoint kept, so the next push resumes.
var ErrIdle = errors.New("push: peer idle")

// idleConn bounds how long the host waits on a stalled peer. Reads and
// writes run in helper goroutines; a wait past the deadline returns
// ErrIdle and leaves the helper blocked (serve's process exits soon
// after). The read deadline moves on at each whole frame (touch), so a
// peer trickling a byte a minute does not keep the lock either.
type idleConn struct {
	r       io.Reader
	w       io.Writer
	timeout time.Duration

	mu       sync.Mutex
	deadline time.Time

	chunks chan chunk
	free   chan []byte
	cur    chunk // what is left of the chunk being read
	once   sync.Once
	dead   error // sticky: once idle, always idle
}

type chunk struct {
	b   []byte
	buf []byte // the buffer to give back
	err error
}

func newIdleConn(rw io.ReadWriter, timeout time.Duration) *idleConn {
	c := &idleConn{r: rw, w: rw, timeout: timeout, chunks: make(chan chunk, 1), free: make(chan []byte, 2)}
	c.free <- make([]byte, 64<<10)
	c.free <- make([]byte, 64<<10)
	c.touch()
	return c
}

// touch moves the read deadline to now plus the timeout.
func (c *idleConn) touch() {
	c.mu.Lock()
	c.deadline = time.Now().Add(c.timeout)
	c.mu.Unlock()
}

func (c *idleConn) wait() <-chan time.Time {
	c.mu.Lock()
	d := time.Until(c.deadline)
	c.mu.Unlock()
	return time.After(max(d, 0))
}

func (c *idleConn) pump() {
	for buf := range c.free {
		n, err := c.r.Read(buf)
		c.chunks <- chunk{b: buf[:n], buf: buf, err: err}
		if err != nil {
			return
		}
	}
}

func (c *idleConn) idle(what string) error {
	c.dead = fmt.Errorf("%w: %s for %s; giving up (a later push resumes)", ErrIdle, what, c.timeout)
	return c.dead
}

func (c *idleConn) Read(p []byte) (int, error) {
	if c.dead != nil {
		return 0, c.dead
	}
	c.once.Do(func() { go c.pump() })
	if len(c.cur.b) == 0 && c.cur.err == nil {
		select {
		case c.cur = <-c.chunks:
		case <-c.wait():
			return 0, c.idle("no frame from the peer")
		}
	}
	n := copy(p, c.cur.b)
	c.cur.b = c.cur.b[n:]
	if len(c.cur.b) == 0 {
		if c.cur.err != nil {
			if n > 0 {
				return n, nil
			}
			return 0, c.cur.err
		}
		c.free <- c.cur.buf
		c.cur = chunk{}
	}
	return n, nil
}

func (c *idleConn) Write(p []byte) (int, error) {
	if c.dead != nil {
		return 0, c.dead
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	b := append([]byte(nil), p...) // the helper may outlive this call
	go func() {
		n, err := c.w.Write(b)
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		return r.n, r.err
	case <-time.After(c.timeout):
		return 0, c.idle("the peer read nothing")
	}
}
