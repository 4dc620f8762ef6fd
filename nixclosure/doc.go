// Package nixclosure reads, validates and hashes Nix closures.
//
// A closure is the set of store paths a NixOS system needs, each with its
// NAR hash, NAR size, deriver and references. Nix writes closures in several
// forms and Parse reads all of them:
//
//   - the exportReferencesGraph text format (no hashes): path, deriver line
//     (empty in practice), reference count, references;
//   - the registration format of `nix-store --dump-db` (narHash as bare hex)
//     and of nixpkgs closureInfo's `registration` file (narHash as
//     sha256:<nix32>), which is Nix's makeValidityRegistration with hashes;
//   - the JSON that exportReferencesGraph writes with __structuredAttrs
//     (Nix 2.8: an array of {path, narHash "sha256:<nix32>", narSize,
//     closureSize, references}, usually under the attribute's name, e.g.
//     {"closure": [...]}). SRI hashes (sha256-<base64>) are accepted too.
//
// The package also serialises store paths as NARs (Nix archives, the format
// of Nix's src/libutil/archive.cc) with a streaming, archive/tar-shaped
// NarWriter, and hashes them (NarHasher) the way `nix-store --query --hash`
// does. NAR hashes are reported as "sha256:<nix32>", where nix32 is Nix's
// base-32 (see EncodeNix32).
//
// Limits: only sha256 hashes; only the default store directory /nix/store is
// checked by Validate unless Closure.StoreDir says otherwise; NARs are written,
// not read.
package nixclosure
