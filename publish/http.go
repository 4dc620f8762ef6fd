package publish

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// httpSource reads objects from any static HTTP server that honours Range.
type httpSource struct {
	base   string // without trailing slash
	client *http.Client
}

func newHTTPSource(u *url.URL) *httpSource {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = 60 * time.Second
	tr.DisableCompression = true // byte counts and ranges are of the objects themselves
	return &httpSource{base: strings.TrimRight(u.String(), "/"), client: &http.Client{Transport: tr}}
}

func (h *httpSource) String() string { return h.base }

func (h *httpSource) do(ctx context.Context, key, rng string) (*http.Response, error) {
	if err := validKey(key); err != nil {
		return nil, err
	}
	u := h.base + "/" + key
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %w (404)", u, ErrNotFound)
	case rng == "" && resp.StatusCode == http.StatusOK, rng != "" && resp.StatusCode == http.StatusPartialContent:
		return resp, nil
	case rng != "" && resp.StatusCode == http.StatusOK:
		resp.Body.Close()
		return nil, &statusError{400, fmt.Sprintf("GET %s with Range: the server answered 200 with the whole object; it must support range requests (nginx and S3 do)", u)}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		resp.Body.Close()
		return nil, &statusError{resp.StatusCode, fmt.Sprintf("GET %s %s: 416 Range Not Satisfiable: the object is shorter than its index says (the store is damaged or an upload is incomplete)", u, rng)}
	default:
		resp.Body.Close()
		return nil, &statusError{resp.StatusCode, fmt.Sprintf("GET %s %s: %s", u, rng, resp.Status)}
	}
}

func (h *httpSource) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	resp, err := h.do(ctx, key, "")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.ContentLength > limit {
		return nil, fmt.Errorf("%w: %s/%s: %d bytes, at most %d allowed", ErrFormat, h.base, key, resp.ContentLength, limit)
	}
	b, err := readObject(resp.Body, limit, h.base, key, func(err error) error { return fmt.Errorf("GET %s/%s: %w", h.base, key, err) })
	if err != nil {
		return nil, err
	}
	if resp.ContentLength >= 0 && int64(len(b)) != resp.ContentLength {
		return nil, fmt.Errorf("GET %s/%s: %d of %d bytes: %w", h.base, key, len(b), resp.ContentLength, io.ErrUnexpectedEOF)
	}
	return b, nil
}

func (h *httpSource) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	rng := fmt.Sprintf("bytes=%d-%d", off, off+n-1)
	resp, err := h.do(ctx, key, rng)
	if err != nil {
		return nil, err
	}
	want := fmt.Sprintf("bytes %d-%d/", off, off+n-1)
	if cr := resp.Header.Get("Content-Range"); !strings.HasPrefix(cr, want) {
		resp.Body.Close()
		return nil, &statusError{502, fmt.Sprintf("GET %s/%s %s: Content-Range %q, want %q…", h.base, key, rng, cr, want)}
	}
	return &exactReader{r: resp.Body, left: n, c: resp.Body}, nil
}
