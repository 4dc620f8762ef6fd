# What nix/package.nix and nix/resize.nix share: the Go source, the hash of
# its vendored modules, the version and the link flags.
#
# vendorHash is what nixpkgs' buildGoModule makes of the modules: `go mod
# vendor`, then the NAR hash of the vendor directory. It is computed here
# without nixpkgs, the same way, and nix/nix_test.go (TestVendorHash)
# recomputes it from go.mod/go.sum:
#
#   go mod vendor -o /tmp/vendor && nix hash path /tmp/vendor
#
# After changing go.mod or go.sum, put the new hash here.
{ lib }:
rec {
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../.;
    name = "nixvm-image-source";
    # Only what the Go build reads: no built binaries, images or benchmark output.
    filter = path: type:
      let base = baseNameOf path; in
      !(lib.elem base [ "bin" "demo" "bench-out" "result" ".git" ])
      && !(lib.hasSuffix ".qcow2" base)
      && !(lib.hasSuffix ".raw" base);
  };

  vendorHash = "sha256-MSfgjelJogCXt6I6fv286wnSXLKKdhCxc1GkbnlAEcs=";

  ldflags = [ "-s" "-w" "-X github.com/nixvm-image/nixvm-image/internal/version.Version=${version}" ];

  meta = {
    homepage = "https://github.com/nixvm-image/nixvm-image";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
  };
}
