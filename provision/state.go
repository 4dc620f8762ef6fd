package provision

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/nixvm-image/nixvm-image/internal/fsutil"
	"github.com/nixvm-image/nixvm-image/store"
)

// A copy onto a block device, an LVM volume or a pool volume is made in
// place, so the disk exists before it holds the image: a run that is killed
// or crashes leaves a disk that looks made. Before such a copy, provision
// writes a record "incomplete" in its state directory, and removes it once
// the copy is synced. A later run that finds the record makes the disk
// again (after the same in-use checks as Force) and says so; it never
// leaves it as it is. Files and overlays need no record: they are written
// under a temporary name and renamed into place once synced.

// stateDir is where the records are: Request.StateDir, or ".provision" in
// the store's directory.
func stateDir(req Request) string {
	if req.StateDir != "" {
		return req.StateDir
	}
	dir := store.DefaultDir
	if req.Store != nil && req.Store.Dir != "" {
		dir = req.Store.Dir
	}
	return filepath.Join(dir, ".provision")
}

// diskID names a disk for its record: its path as given (an LV's path
// exists only once it is created), or its pool and volume.
func diskID(req Request) string {
	if req.Kind == Pool {
		return "pool:" + req.Pool + "/" + req.Volume
	}
	return "path:" + filepath.Clean(req.Target)
}

func recordPath(req Request) string {
	sum := sha256.Sum256([]byte(diskID(req)))
	return filepath.Join(stateDir(req), "incomplete-"+hex.EncodeToString(sum[:12]))
}

// markIncomplete records, durably, that the disk is being made.
func markIncomplete(req Request) error {
	dir := stateDir(req)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("provision: state directory: %w", err)
	}
	p := recordPath(req)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(diskID(req)+"\n"), 0o600); err != nil {
		return fmt.Errorf("provision: recording %s as incomplete: %w", diskID(req), err)
	}
	f, err := os.Open(tmp)
	if err == nil {
		err = errors.Join(f.Sync(), f.Close())
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		err = fsutil.SyncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("provision: recording %s as incomplete: %w", diskID(req), err)
	}
	return nil
}

// markComplete removes the record: the disk is whole, or gone.
func markComplete(req Request) error {
	err := os.Remove(recordPath(req))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil {
		err = fsutil.SyncDir(stateDir(req))
	}
	if err != nil {
		return fmt.Errorf("provision: recording %s as complete: %w", diskID(req), err)
	}
	return nil
}

// incomplete reports whether a run was cut short while making the disk.
func incomplete(req Request) (bool, error) {
	_, err := os.Stat(recordPath(req))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("provision: reading the state of %s: %w", diskID(req), err)
}

// crashHook, when set (by tests), runs after each write of a copy.
var crashHook func()
