// Package imagebuild is the image pipeline: closure -> plan -> raw disk ->
// qcow2 (or raw) + manifest.
//
// Everything is written on the host, in-process, without root, loop devices
// or a VM. Store paths are scanned with lstat/readdir, then every file is
// read once: its bytes stream into the ext4 writer and into the path's NAR
// hash at the same time, so given hashes are verified for free and missing
// ones cost nothing extra. The raw disk is a sparse temporary file in the
// output's directory; one pass over its data (holes are skipped) feeds the
// qcow2 writer and the manifest's block hasher. Outputs appear by rename
// only when everything succeeded; after an error nothing is left behind.
//
// Determinism: every identifier (MBR signature, GPT GUIDs, ext4 UUID and
// hash seed, FAT serial) derives from the toplevel's store path, every
// timestamp from Options.Epoch, and the order of everything from sorted
// store paths and names. Same closure and options, same bytes.
package imagebuild
