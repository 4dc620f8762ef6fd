package nixclosure

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// DumpPath writes the NAR serialisation of the file system object at fsPath
// to w, like `nix-store --dump`. A regular file is executable in the NAR when
// its owner-execute bit is set. Other file types (devices, sockets, FIFOs) are
// an error, as in Nix.
func DumpPath(w io.Writer, fsPath string) error {
	nw := NewNarWriter(w)
	if err := dumpTree(nw, fsPath, ""); err != nil {
		return err
	}
	return nw.Close()
}

// HashPath returns the NAR hash ("sha256:<nix32>") and NAR size of the file
// system object at fsPath, like `nix-store --query --hash` and
// `nix-store --query --size` for a valid store path.
func HashPath(fsPath string) (hash string, size uint64, err error) {
	nh := NewNarHasher()
	if err := dumpTree(nh.NarWriter, fsPath, ""); err != nil {
		return "", 0, err
	}
	if err := nh.Close(); err != nil {
		return "", 0, err
	}
	hash, size = nh.Sum()
	return hash, size, nil
}

func dumpTree(nw *NarWriter, fsPath, rel string) error {
	fi, err := os.Lstat(fsPath)
	if err != nil {
		return err
	}
	switch m := fi.Mode(); {
	case m.IsRegular():
		f, err := os.Open(fsPath)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := nw.WriteHeader(&NarHeader{Path: rel, Type: NarRegular, Executable: m.Perm()&0o100 != 0, Size: fi.Size()}); err != nil {
			return err
		}
		if _, err := io.Copy(nw, f); err != nil {
			return fmt.Errorf("%s: %w", fsPath, err)
		}
		return nil
	case m.IsDir():
		if err := nw.WriteHeader(&NarHeader{Path: rel, Type: NarDirectory}); err != nil {
			return err
		}
		entries, err := os.ReadDir(fsPath) // sorted by name, byte-wise
		if err != nil {
			return err
		}
		for _, e := range entries {
			child := e.Name()
			if rel != "" {
				child = rel + "/" + child
			}
			if err := dumpTree(nw, filepath.Join(fsPath, e.Name()), child); err != nil {
				return err
			}
		}
		return nil
	case m&fs.ModeSymlink != 0:
		target, err := os.Readlink(fsPath)
		if err != nil {
			return err
		}
		return nw.WriteHeader(&NarHeader{Path: rel, Type: NarSymlink, Linkname: target})
	default:
		return fmt.Errorf("%w: %s: unsupported file type %v", ErrNarHeader, fsPath, fi.Mode().Type())
	}
}
