package publish

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// dirTarget is a directory (file:// URL).
type dirTarget struct{ dir string }

func openDir(u *url.URL) (*dirTarget, error) {
	if u.Host != "" && u.Host != "localhost" {
		return nil, fmt.Errorf("publish: %s: a file URL names a local directory: file:///DIR", u)
	}
	if u.Path == "" {
		return nil, fmt.Errorf("publish: %s: no directory; want file:///DIR", u)
	}
	return &dirTarget{dir: filepath.Clean(u.Path)}, nil
}

func (d *dirTarget) String() string { return "file://" + d.dir }

func (d *dirTarget) path(key string) (string, error) {
	if err := validKey(key); err != nil {
		return "", err
	}
	return filepath.Join(d.dir, filepath.FromSlash(key)), nil
}

// open opens the object key; ErrNotFound when there is none.
func (d *dirTarget) open(key string) (*os.File, error) {
	p, err := d.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s/%s: %w", d, key, ErrNotFound)
	}
	return f, err
}

func (d *dirTarget) Get(ctx context.Context, key string, limit int64) ([]byte, error) {
	f, err := d.open(key)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := readObject(f, limit, d, key, func(err error) error { return err })
	if err != nil {
		return nil, err
	}
	return b, nil
}

func (d *dirTarget) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	f, err := d.open(key)
	if err != nil {
		return nil, err
	}
	return &exactReader{r: io.NewSectionReader(f, off, n), left: n, c: f}, nil
}

func (d *dirTarget) Put(ctx context.Context, key string, r io.Reader, size int64) error {
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	n, err := io.Copy(tmp, r)
	if err == nil && n != size {
		err = fmt.Errorf("publish: %s: wrote %d bytes, want %d", key, n, size)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("publish: writing %s: %w", p, err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return err
	}
	df, err := os.Open(filepath.Dir(p))
	if err != nil {
		return err
	}
	defer df.Close()
	return df.Sync()
}

func (d *dirTarget) List(ctx context.Context, prefix string) ([]string, error) {
	dir := filepath.Join(d.dir, filepath.FromSlash(prefix))
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, e := range ents {
		if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), ".") {
			keys = append(keys, path.Join(prefix, e.Name()))
		}
	}
	sort.Strings(keys)
	return keys, nil
}
