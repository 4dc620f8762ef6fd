# nixvm-image (and a nixvm-resize beside it, which the build adds to the
# systems it builds when they give none), static (CGO_ENABLED=0), as
# `make build` makes them. The wrapper puts what nixvm-image runs on PATH:
# QEMU (the VM stage; qemu-img for provision) and xz (.ko.xz kernel modules)
# first; OpenSSH (push) and LVM (provision --target /dev/VG/LV) after the
# system's own. Nix itself is the user's: nixvm-image runs the nix-build,
# nix and nix-store it finds. virsh comes from the host's libvirt (the host
# module puts it on PATH).
#
# go.mod asks for Go 1.26: pass a buildGoModule whose Go is at least that
# (flake.nix uses buildGo126Module when nixpkgs has it).
{ lib, buildGoModule, makeWrapper, qemu_kvm, xz, openssh, lvm2 }:
let
  source = import ./source.nix { inherit lib; };
in
buildGoModule {
  pname = "nixvm-image";
  inherit (source) version src vendorHash ldflags;

  subPackages = [ "cmd/nixvm-image" "cmd/nixvm-resize" ];

  env.CGO_ENABLED = "0";
  nativeBuildInputs = [ makeWrapper ];

  postInstall = ''
    wrapProgram $out/bin/nixvm-image \
      --prefix PATH : ${lib.makeBinPath [ qemu_kvm xz ]} \
      --suffix PATH : ${lib.makeBinPath [ openssh lvm2 ]}
  '';

  # The tests need root, QEMU, loop devices, libvirtd and a Nix store: they
  # run in CI with `make test`; the flake's checks evaluate the modules.
  doCheck = false;

  meta = source.meta // {
    description = "Deterministic NixOS qcow2 images from a Nix closure, pushed to libvirt hosts block by block, provisioned as guest disks";
    mainProgram = "nixvm-image";
  };
}
