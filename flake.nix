{
  description = "nixvm-image: deterministic NixOS disk images for libvirt hosts, pushed block by block, provisioned as guest disks";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      nixvm-image = pkgs.callPackage ./nix/package.nix {
        buildGoModule = pkgs.buildGo126Module or pkgs.buildGoModule;
      };
    in
    {
      packages.${system} = {
        inherit nixvm-image;
        default = nixvm-image;
      };

      nixosModules = {
        # The host: services.nixvm.guests, the image store, gc.
        host = { lib, ... }: {
          imports = [ ./nix/host.nix ];
          services.nixvm.package = lib.mkDefault self.packages.${system}.default;
        };
        # The image plumbing `nixvm-image build` adds to a guest (root by
        # label, boot loader, virtio, first-boot nixvm-resize).
        guest = { lib, ... }: {
          imports = [ ./nix/guest.nix ];
          nixvm.package = lib.mkDefault self.packages.${system}.default;
        };
        default = self.nixosModules.host;
      };
    };
}
