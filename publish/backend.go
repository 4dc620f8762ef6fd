package publish

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
)

var errNoSpace = syscall.ENOSPC

// Source is where a host reads published objects from: any static HTTP
// server or CDN, an S3 bucket, or a directory.
type Source interface {
	// Get returns a whole object of at most limit bytes.
	Get(ctx context.Context, key string, limit int64) ([]byte, error)
	// GetRange returns bytes [off, off+n) of an object; the reader fails
	// with io.ErrUnexpectedEOF if the body ends early.
	GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error)
	String() string
}

// Target is where publish writes: a directory or an S3 bucket.
type Target interface {
	Source
	// Put stores an object; visible to readers only when complete.
	Put(ctx context.Context, key string, r io.Reader, size int64) error
	// List returns the keys under prefix (which ends in "/").
	List(ctx context.Context, prefix string) ([]string, error)
}

// ErrNotFound reports an object that does not exist.
var ErrNotFound = errors.New("not found")

// statusError is an HTTP-level failure.
type statusError struct {
	Code int
	Msg  string
}

func (e *statusError) Error() string { return e.Msg }

// permanent says a fetch error will not go away by retrying.
func permanent(err error) bool {
	var re *retryable
	if errors.As(err, &re) {
		return false
	}
	var pe *permanentErr
	if errors.As(err, &pe) {
		return true
	}
	var se *statusError
	if errors.As(err, &se) {
		return se.Code < 500 && se.Code != 429 && se.Code != 408
	}
	return errors.Is(err, ErrNotFound) || errors.Is(err, ErrFormat) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// Options configure how a URL is opened.
type Options struct {
	// Endpoint is the S3 endpoint for non-AWS stores (host:port or URL).
	Endpoint string
	// Region for S3; "" lets the client ask the bucket.
	Region string
}

// Open returns the source a URL names: file:///DIR, http(s)://HOST/PATH,
// s3://BUCKET/PREFIX.
func Open(raw string, o Options) (Source, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("publish: URL %q: %w", raw, err)
	}
	switch u.Scheme {
	case "file":
		return openDir(u)
	case "http", "https":
		return newHTTPSource(u), nil
	case "s3":
		return openS3(u, o)
	}
	return nil, fmt.Errorf("publish: URL %q: want file:///DIR, http(s)://HOST/PATH or s3://BUCKET/PREFIX", raw)
}

// OpenTarget returns the target a URL names: file:///DIR or s3://BUCKET/PREFIX.
func OpenTarget(raw string, o Options) (Target, error) {
	s, err := Open(raw, o)
	if err != nil {
		return nil, err
	}
	t, ok := s.(Target)
	if !ok {
		return nil, fmt.Errorf("publish: cannot publish to %q: an HTTP server is read-only here; publish to the directory it serves (file:///DIR) or to s3://BUCKET/PREFIX", raw)
	}
	return t, nil
}

// validKey refuses keys that could leave the base: only our own layout's
// characters, no empty or dot segments.
func validKey(key string) error {
	if key == "" || strings.HasPrefix(key, "/") {
		return fmt.Errorf("publish: bad object key %q", key)
	}
	for _, seg := range strings.Split(key, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.HasPrefix(seg, ".") {
			return fmt.Errorf("publish: bad object key %q", key)
		}
		for _, c := range []byte(seg) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
				return fmt.Errorf("publish: bad object key %q", key)
			}
		}
	}
	return nil
}

// exactReader reads exactly left bytes, failing with
// io.ErrUnexpectedEOF if the underlying reader ends early.
type exactReader struct {
	r    io.Reader
	left int64
	c    io.Closer
}

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	if e.left == 0 && err == io.EOF {
		err = nil
	}
	return n, err
}

func (e *exactReader) Close() error { return e.c.Close() }

// Counter counts what a source served: requests and body bytes.
type Counter struct {
	Source
	Requests atomic.Int64
	Bytes    atomic.Int64
}

func (c *Counter) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	c.Requests.Add(1)
	b, err := c.Source.Get(ctx, key, limit)
	c.Bytes.Add(int64(len(b)))
	return b, err
}

func (c *Counter) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	c.Requests.Add(1)
	r, err := c.Source.GetRange(ctx, key, off, n)
	if err != nil {
		return nil, err
	}
	return &countingReader{r, &c.Bytes}, nil
}

type countingReader struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// readObject reads an object's body r, at most limit bytes: a read error
// goes through wrap, a longer body is ErrFormat naming where/key.
func readObject(r io.Reader, limit int64, where any, key string, wrap func(error) error) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, wrap(err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%w: %s/%s: larger than %d bytes", ErrFormat, where, key, limit)
	}
	return b, nil
}
