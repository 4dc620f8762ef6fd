# Evaluates nix/host.nix, nix/package.nix and flake.nix against the stubs and
# returns what the Go test (provision/nix_test.go) checks. stubBin is a
# directory with bin/virsh and bin/nixvm-image, so the generated unit scripts
# can be run against fakes. Run:
#   nix-instantiate --eval --strict --json --read-write-mode \
#     testdata/nix-stubs/eval.nix --argstr stubBin /tmp/x
{ stubBin ? "/nonexistent" }:
let
  lib = import ./lib.nix;
  pkg = name: { outPath = stubBin; inherit name; };
  pkgs = {
    inherit lib;
    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";
    writeShellScriptBin = name: text: { outPath = builtins.toFile name "#!/bin/sh\n${text}"; inherit name; };
    buildGoModule = a: a;
    callPackage = f: args: import f ({ inherit lib; buildGoModule = a: a; } // args);
    coreutils = pkg "coreutils";
    gnused = pkg "gnused";
    lvm2 = pkg "lvm2";
  };
  host = import ./eval-module.nix {
    inherit lib pkgs;
    module = import ../../nix/host.nix;
    outside.virtualisation.libvirtd = { package = pkg "libvirt"; qemu.package = pkg "qemu"; };
    userConfig.services.nixvm = {
      enable = true;
      package = pkg "nixvm-image";
      guests = {
        some-athens-guest = {
          memory = 4096;
          diskSize = "50G";
          mac = "D2:91:69:C0:14:9A";
          disk = { type = "device"; path = "/dev/vg/guest-some-athens-guest"; };
          network = { type = "direct"; source = "enp30s0"; };
        };
        web1 = { memory = 2048; diskSize = "20G"; mac = "52:54:00:00:00:01"; shutdownTimeout = 2; };
        ci1 = { memory = 1024; diskSize = "20G"; mac = "52:54:00:00:00:02"; disk.type = "overlay"; autostart = false; };
      };
    };
  };
  d = host.definitions;
  units = d.systemd.services;
  flake = import ../../flake.nix;
  flakeOut = flake.outputs {
    self = flakeOut // { outPath = toString ../..; };
    nixpkgs.legacyPackages.x86_64-linux = pkgs;
  };
  package = flakeOut.packages.x86_64-linux.default;
  hostModule = flakeOut.nixosModules.host { lib = lib; };
  guestModule = flakeOut.nixosModules.guest { lib = lib; };
in
{
  units = builtins.mapAttrs (n: u: {
    wantedBy = u.wantedBy or [ ];
    inherit (u) after;
    requires = u.requires or [ ];
    path = map (p: p.name) (u.path or [ ]);
    serviceConfig = u.serviceConfig;
  }) units;
  timers = d.systemd.timers;
  tmpfiles = d.systemd.tmpfiles.rules;
  libvirtd = d.virtualisation.libvirtd.enable;
  systemPackages = map (p: p.name) d.environment.systemPackages;
  orphans = "${builtins.elemAt d.environment.systemPackages 1}";
  guests = host.config.services.nixvm.guests;
  package = {
    inherit (package) pname subPackages vendorHash doCheck;
    cgo = package.env.CGO_ENABLED;
    srcName = package.src.name;
  };
  flake = {
    packages = builtins.attrNames flakeOut.packages.x86_64-linux;
    nixosModules = builtins.attrNames flakeOut.nixosModules;
    hostImports = map toString hostModule.imports;
    guestImports = map toString guestModule.imports;
    hostPackage = hostModule.services.nixvm.package.pname;
    guestPackage = guestModule.nixvm.package.pname;
  };
}
