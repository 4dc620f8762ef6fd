// Package publish writes image generations once to object storage (a
// directory behind any static HTTP server or CDN, or an S3 bucket) and pulls
// them into a host's image store, fetching only the 4 KiB blocks that no
// generation the host holds already has.
//
// Identity is push's: 4 KiB blocks hashed with BLAKE3-128, the image digest
// over the block list (package manifest). Nothing here runs a server.
//
// # Object layout under a base URL
//
//	packs/<H>.idx            pack index; H is BLAKE3-256 (hex) of these bytes
//	packs/<H>.pack           the zstd frames the index describes
//	recipes/<D>.full         the block list of image D, as runs over pack indexes
//	recipes/<D>.from-<B>     the block list of D as runs over image B's (a delta)
//	NAME/latest              pointer: digest, size, recipes, optional signature
//
// Every object but NAME/latest is immutable and content-addressed: a pack
// index by the hash of its bytes, a pack by its index (which holds the
// pack's size and BLAKE3-256), a recipe by the image digest it must
// reproduce. NAME/latest is written last, after everything it names.
//
// A pack holds the blocks that no earlier pack held, in image order, cut
// into frames of consecutive blocks (at most FrameBlocks, default 16 = 64
// KiB), each frame compressed on its own with zstd so that any frame can be
// fetched with one range request and decoded alone. Publishing a rebuild
// therefore uploads one pack with the new blocks, its index (16 bytes per
// block), two small recipes and the pointer.
//
// A host reads NAME/latest, then the delta recipe from a generation it holds
// (else the full one and every pack index it names), rebuilds and checks
// the block list against the digest, looks up the blocks that none of its
// generations has in the pack indexes, and fetches their frames with range
// requests, merging frames closer than a gap into one request. Every block
// is checked against its hash before it is written; the store checks the
// digest of the whole image again before current moves.
package publish
