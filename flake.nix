{
  description = "nixvm-image: deterministic NixOS disk images for libvirt hosts, pushed block by block, provisioned as guest disks";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The packages, made with whatever pkgs they are given: the flake's
      # own nixpkgs for `packages`, the user's for the overlay and the
      # modules (so a host builds them for its own system and nixpkgs).
      packagesFor = pkgs:
        let buildGoModule = pkgs.buildGo126Module or pkgs.buildGoModule; in
        {
          nixvm-image = pkgs.callPackage ./nix/package.nix { inherit buildGoModule; };
          nixvm-resize = pkgs.callPackage ./nix/resize.nix { inherit buildGoModule; };
        };
    in
    {
      # pkgs.nixvm-image and pkgs.nixvm-resize; with it applied the guest
      # module's nixvm.resize.package defaults to pkgs.nixvm-resize.
      overlays.default = final: prev: packagesFor final;

      packages = forAllSystems (pkgs:
        let p = packagesFor pkgs; in p // { default = p.nixvm-image; });

      nixosModules = {
        # The host: services.nixvm.guests, the image store, gc.
        host = { lib, pkgs, ... }: {
          imports = [ ./nix/host.nix ];
          services.nixvm.package = lib.mkDefault (packagesFor pkgs).nixvm-image;
        };
        # A guest's image plumbing (root by label, boot loader for
        # nixvm.layout, virtio, first-boot growth with this flake's
        # nixvm-resize). `nixvm-image build` adds the same module; importing
        # it as well is harmless.
        guest = { lib, pkgs, ... }: {
          imports = [ ./nix/guest.nix ];
          nixvm.resize.package = lib.mkDefault (packagesFor pkgs).nixvm-resize;
        };
        default = self.nixosModules.host;
      };

      # `nix flake check`: both packages build, and the modules evaluate
      # with real nixpkgs (./nix/checks.nix: the guest module imported twice
      # with its own root device, its growth unit; the host module's units,
      # no restart on a rebuild, each domain XML valid for libvirt).
      checks = forAllSystems (pkgs:
        let p = packagesFor pkgs; in
        {
          inherit (p) nixvm-image nixvm-resize;
        } // import ./nix/checks.nix { inherit self nixpkgs pkgs; });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style or pkgs.nixfmt);
    };
}
