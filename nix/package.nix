# nixvm-image and nixvm-resize, static (CGO_ENABLED=0), as in `make build`.
#
# vendorHash: Nix cannot be asked here (no nixpkgs on the machines this was
# written on), so it was computed the way nixpkgs' go-modules step makes its
# output: `go mod vendor -o DIR` with Go 1.26, then the NAR hash of DIR
# (`nix hash path DIR`). It matches when nixpkgs' Go writes the same
# vendor/modules.txt; if a build reports a hash mismatch, put the "got:" hash
# here (after changing go.mod/go.sum, recompute it the same way or set
# lib.fakeHash and copy the hash the build reports).
#
# go.mod asks for Go 1.26: pass a buildGoModule whose Go is at least that
# (flake.nix uses buildGo126Module when nixpkgs has it).
{ lib, buildGoModule }:

buildGoModule {
  pname = "nixvm-image";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../.;
    # Only what the Go build reads: no built binaries, images or benchmark output.
    filter = path: type:
      let base = baseNameOf path; in
      !(lib.elem base [ "bin" "demo" "bench-out" "result" ".git" ])
      && !(lib.hasSuffix ".qcow2" base)
      && !(lib.hasSuffix ".raw" base);
  };

  vendorHash = "sha256-Wce1OVHu7LokyP+qxeCogzhsiVm34jKXLkbZO6uIWm8=";

  subPackages = [ "cmd/nixvm-image" "cmd/nixvm-resize" ];

  env.CGO_ENABLED = "0";
  ldflags = [ "-s" "-w" ];

  # The tests need root, QEMU, loop devices, libvirtd and a Nix store: they
  # run in CI with `make test`, not in the sandbox.
  doCheck = false;

  meta = {
    description = "Deterministic NixOS qcow2 images from a Nix closure, pushed to libvirt hosts block by block, provisioned as guest disks";
    homepage = "https://github.com/nixvm-image/nixvm-image";
    platforms = lib.platforms.linux;
    mainProgram = "nixvm-image";
  };
}
