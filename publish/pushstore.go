package publish

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/lima-vm/go-qcow2reader"
	"github.com/nixvm-image/nixvm-image/manifest"
	"github.com/nixvm-image/nixvm-image/push"
	"github.com/nixvm-image/nixvm-image/qcow"
)

// PushStore adapts push's host store (the layout push.Store documents:
// DIR/NAME/<digest>.qcow2 and .qcow2.manifest, DIR/NAME/current) to Store.
// It goes away when the store has its own package.
type PushStore struct {
	S *push.Store
}

func (p PushStore) dir(name string) string {
	d := p.S.Dir
	if d == "" {
		d = push.DefaultStoreDir
	}
	return filepath.Join(d, name)
}

func (p PushStore) Generations(name string) ([]LocalGeneration, error) {
	gens, err := p.S.List(name)
	if err != nil {
		return nil, err
	}
	out := make([]LocalGeneration, len(gens))
	for i, g := range gens {
		path := g.Path
		digest := g.Digest
		out[i] = LocalGeneration{
			Digest:  g.Digest,
			Current: g.Current,
			Manifest: func() (*manifest.Manifest, error) {
				f, err := os.Open(path + ".manifest")
				if err != nil {
					return nil, err
				}
				defer f.Close()
				m, err := manifest.Read(bufio.NewReaderSize(f, 1<<20))
				if err != nil {
					return nil, fmt.Errorf("%s.manifest: %w", path, err)
				}
				if m.Digest != digest {
					return nil, fmt.Errorf("%s.manifest: digest %x, want %x", path, m.Digest, digest)
				}
				return m, nil
			},
			Open: func() (BlockReader, error) { return openQcow(path) },
		}
	}
	return out, nil
}

type qcowReader struct {
	io.ReaderAt
	close func() error
}

func (q qcowReader) Close() error { return q.close() }

func openQcow(path string) (BlockReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	img, err := qcow2reader.Open(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return qcowReader{img, func() error { img.Close(); return f.Close() }}, nil
}

func (p PushStore) Lock(name string) (func(), error) { return p.S.Lock(name) }

func (p PushStore) ScratchDir(name string) (string, error) {
	if err := ValidName(name); err != nil {
		return "", err
	}
	d := filepath.Join(p.dir(name), ".pull")
	return d, os.MkdirAll(d, 0o700)
}

// Install writes the generation as push does: an uncompressed qcow2 and
// its manifest, each through a temporary file, fsync and rename, every
// block checked against m on the way; then it swaps current.
func (p PushStore) Install(name string, m *manifest.Manifest, content io.ReaderAt, link string) error {
	if err := m.Validate(); err != nil {
		return err
	}
	dir := p.dir(name)
	scratch, err := p.ScratchDir(name)
	if err != nil {
		return err
	}
	base := filepath.Join(dir, hex.EncodeToString(m.Digest[:]))
	tmpIdx := filepath.Join(scratch, "install.manifest.tmp")
	tmpImg := filepath.Join(scratch, "install.qcow2.tmp")
	defer os.Remove(tmpIdx)
	defer os.Remove(tmpImg)
	plain := &manifest.Manifest{VirtualSize: m.VirtualSize, Blocks: m.Blocks, Digest: m.Digest}
	if err := writeFileSync(tmpIdx, 0o444, func(w io.Writer) error { _, err := plain.WriteTo(w); return err }); err != nil {
		return err
	}
	err = writeFileSync(tmpImg, 0o444, func(w io.Writer) error {
		qw, err := qcow.NewWriter(w.(*os.File), m.VirtualSize, qcow.Options{Compression: qcow.None})
		if err != nil {
			return err
		}
		return copyVerified(qw, content, m)
	})
	if err != nil {
		return err
	}
	if err := os.Rename(tmpIdx, base+".qcow2.manifest"); err != nil {
		return err
	}
	if err := os.Rename(tmpImg, base+".qcow2"); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return p.Activate(name, m.Digest, link)
}

// copyVerified copies content's non-zero blocks into qw, checking each
// against m, then closes qw.
func copyVerified(qw *qcow.Writer, content io.ReaderAt, m *manifest.Manifest) error {
	const batch = 256
	buf := make([]byte, batch*BlockSize)
	zero := manifest.ZeroHash()
	n := int64(len(m.Blocks))
	for b := int64(0); b < n; b += batch {
		cnt := min(batch, n-b)
		allZero := true
		for i := b; i < b+cnt; i++ {
			if m.Blocks[i] != zero {
				allZero = false
				break
			}
		}
		if allZero {
			continue
		}
		chunk := buf[:cnt*BlockSize]
		clear(chunk)
		end := min(int64(len(chunk)), m.VirtualSize-b*BlockSize)
		if k, err := content.ReadAt(chunk[:end], b*BlockSize); int64(k) < end {
			return fmt.Errorf("publish: reading the pulled image at %d: %v", b*BlockSize, err)
		}
		for i := int64(0); i < cnt; i++ {
			if got := manifest.HashBlock(chunk[i*BlockSize : (i+1)*BlockSize]); got != m.Blocks[b+i] {
				return fmt.Errorf("%w: block %d of the pulled image: got %x, want %x", ErrVerify, b+i, got, m.Blocks[b+i])
			}
		}
		if _, err := qw.WriteAt(chunk[:end], b*BlockSize); err != nil {
			return err
		}
	}
	return qw.Close()
}

func (p PushStore) Activate(name string, digest [32]byte, link string) error {
	dir := p.dir(name)
	file := hex.EncodeToString(digest[:]) + ".qcow2"
	if _, err := os.Stat(filepath.Join(dir, file)); err != nil {
		return err
	}
	if err := replaceSymlink(file, filepath.Join(dir, "current")); err != nil {
		return err
	}
	if link != "" {
		abs, err := filepath.Abs(filepath.Join(dir, file))
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			return fmt.Errorf("--link %s: %w", link, err)
		}
		if err := replaceSymlink(abs, link); err != nil {
			return fmt.Errorf("--link %s: %w", link, err)
		}
	}
	return nil
}

func replaceSymlink(target, path string) error {
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func writeFileSync(path string, mode os.FileMode, fill func(io.Writer) error) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	err = fill(f)
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}
