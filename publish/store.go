package publish

import (
	"io"

	"github.com/nixvm-image/nixvm-image/manifest"
)

// Store is what pull needs from a host's image store. Push fills the same
// store; HostStore adapts the host image store (package store).
type Store interface {
	// Generations lists name's complete generations, current first.
	Generations(name string) ([]LocalGeneration, error)
	// Lock takes name's lock without waiting (the one push takes).
	Lock(name string) (unlock func(), err error)
	// ScratchDir is a directory for name's partial pull, on the store's
	// file system, kept across runs so a cut pull resumes.
	ScratchDir(name string) (string, error)
	// Install adds a generation: content (the guest-visible disk, which the
	// store checks block by block against m again) becomes the image, m
	// its manifest; then current, and link when not empty, point at it.
	// Nothing changes when it fails.
	Install(name string, m *manifest.Manifest, content io.ReaderAt, link string) error
	// Activate points current (and link) at a generation the store holds.
	Activate(name string, digest [32]byte, link string) error
}

// LocalGeneration is one generation a host holds.
type LocalGeneration struct {
	Digest  [32]byte
	Current bool
	// Manifest loads the generation's block hashes.
	Manifest func() (*manifest.Manifest, error)
	// Open reads the generation's guest-visible content.
	Open func() (BlockReader, error)
}

// BlockReader reads a generation's guest-visible disk.
type BlockReader interface {
	io.ReaderAt
	io.Closer
}
