package imagebuild

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/nixvm-image/nixvm-image/ext4"
	"github.com/nixvm-image/nixvm-image/nixclosure"
)

// walkHeaders calls fn with the ext4 header of every entry of the store path
// at storePath, in NAR order: canonical store ownership, modes and mtime,
// and hard links (nix-store --optimise) pointing at their first occurrence.
func walkHeaders(tree *node, storePath string, fn func(n *node, rel string, hdr *ext4.Header) error) error {
	imgRoot := strings.TrimPrefix(storePath, "/")
	return walk(tree, "", func(n *node, rel string) error {
		img := imgRoot
		if rel != "" {
			img += "/" + rel
		}
		hdr := &ext4.Header{Name: img, Mtime: 1}
		switch n.kind {
		case kindDir:
			hdr.Type, hdr.Mode = ext4.TypeDir, 0o555
		case kindSymlink:
			hdr.Type, hdr.Mode, hdr.Linkname = ext4.TypeSymlink, 0o777, n.target
		case kindReg:
			hdr.Type, hdr.Mode, hdr.Size = ext4.TypeReg, 0o444, n.size
			if n.exec {
				hdr.Mode = 0o555
			}
			if n.first != nil {
				hdr.Type, hdr.Linkname, hdr.Size = ext4.TypeLink, imagePath(n.first), 0
			}
		}
		return fn(n, rel, hdr)
	})
}

// writeStorePath streams one store path into the file system and its NAR
// hasher, returning the NAR hash ("sha256:<nix32>") and size.
func (b *builder) writeStorePath(w *ext4.Writer, storePath string, tree *node) (string, uint64, error) {
	nar := newNarPipe(b.bufs)
	err := walkHeaders(tree, storePath, func(n *node, rel string, hdr *ext4.Header) error {
		src := storePath
		if rel != "" {
			src += "/" + rel
		}
		nhdr := &nixclosure.NarHeader{Path: rel}
		switch n.kind {
		case kindDir:
			nhdr.Type = nixclosure.NarDirectory
		case kindSymlink:
			nhdr.Type, nhdr.Linkname = nixclosure.NarSymlink, n.target
		case kindReg:
			owner := n
			if n.first != nil {
				owner = n.first
			}
			nhdr.Type, nhdr.Executable, nhdr.Size = nixclosure.NarRegular, owner.exec, owner.size
		}
		nar.header(nhdr)
		if err := w.WriteHeader(hdr); err != nil {
			return fmt.Errorf("write %s: %w", src, err)
		}
		if n.kind != kindReg {
			return nil
		}
		// A hard link's bytes only feed its NAR hash; the image has them.
		var img io.Writer
		if n.first == nil {
			img = w
		}
		return b.copyFile(img, nar, src, nhdr.Size)
	})
	hash, size, nerr := nar.finish()
	if err != nil {
		return "", 0, err
	}
	if nerr != nil {
		return "", 0, fmt.Errorf("BUG: NAR of %s: %w", storePath, nerr)
	}
	return hash, size, nil
}

// copyFile copies the size bytes of src to img (nil: none) and the NAR pipe.
func (b *builder) copyFile(img io.Writer, nar *narPipe, src string, size int64) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	var done int64
	for done < size {
		buf := <-b.bufs
		n, err := f.Read(buf[:min(int64(len(buf)), size-done)])
		if n == 0 {
			b.bufs <- buf
		} else {
			if img != nil {
				if _, werr := img.Write(buf[:n]); werr != nil {
					b.bufs <- buf
					return fmt.Errorf("write %s: %w", src, werr)
				}
				if b.opts.Progress != nil {
					b.opts.Progress.Add(int64(n))
				}
			}
			nar.data(buf[:n])
			done += int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", src, err)
		}
	}
	if done != size {
		return fmt.Errorf("%s changed while it was read: got %d bytes, want %d (store paths must not change during a build)", src, done, size)
	}
	var one [1]byte
	if n, _ := f.Read(one[:]); n != 0 {
		return fmt.Errorf("%s grew while it was read (store paths must not change during a build)", src)
	}
	return nil
}
