// Package fsutil holds the few file-system steps that several packages need
// done the same careful way: write a file whole or not at all, and make a
// rename durable.
package fsutil

import (
	"io"
	"os"
	"path/filepath"
)

// SyncDir fsyncs the directory dir, so that a rename or create inside it
// survives a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// WriteFileAtomic writes b to path with mode: into a temporary file in the
// same directory, synced, renamed over path, directory synced. A reader sees
// the old file or the whole new one, never a part.
func WriteFileAtomic(path string, b []byte, mode os.FileMode) error {
	return WriteAtomicWith(path, mode, func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

// WriteAtomicWith is WriteFileAtomic with the contents written by fill. When
// fill fails, path is untouched and the temporary file removed.
func WriteAtomicWith(path string, mode os.FileMode, fill func(w io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = fill(f); err != nil {
		return err
	}
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	return SyncDir(dir)
}
