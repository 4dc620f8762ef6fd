// Package imagebuild is the image pipeline: closure -> plan -> raw disk ->
// VM stage -> qcow2 (or raw) + manifest.
//
// Build runs the phases in order, each a method in a file of its own:
//
//	loadPrevious  previous.go  the layout map of Options.Previous, if any
//	scanStore     scan.go      every store path's tree, with lstat and readdir
//	planDisk      plan.go      file system size, partition plan (auto, Size, or kept)
//	writeRawDisk  root.go      partition table, ESP and root file system on a sparse raw disk
//	vmStage       build.go     Options.Bootloader on the raw disk (imagebuild/vm)
//	pack          pack.go      one pass over the raw disk: qcow2 writer and block hasher
//	publish       publish.go   manifest beside the image, both synced and renamed into place
//
// Everything but the VM stage is written on the host, in-process, without
// root, loop devices or a VM. Store paths are scanned with lstat/readdir,
// then every file is read once: its bytes stream into the ext4 writer and
// into the path's NAR hash at the same time, so given hashes are verified for
// free and missing ones cost nothing extra. The raw disk is a sparse
// temporary file in the output's directory; one pass over its data (holes
// are skipped) feeds the qcow2 writer and the manifest's block hasher.
// Outputs appear by rename only when everything succeeded; after an error,
// cancellation included, nothing is left behind and an output being replaced
// is untouched.
//
// Errors are typed (ErrExist, ErrTooSmall and SizeError, ErrMissing,
// ErrPrevious, ErrFormat, ErrStoreDir, ErrUnsupportedFile, and those of the
// packages below) and name the input, never a command-line flag: the CLI
// adds those.
//
// Determinism: every identifier (MBR signature, GPT GUIDs, ext4 UUID and
// hash seed, FAT serial) derives from the toplevel's store path, every
// timestamp from Options.Epoch, and the order of everything from sorted
// store paths and names. Same closure and options, same bytes (TestGolden).
package imagebuild
