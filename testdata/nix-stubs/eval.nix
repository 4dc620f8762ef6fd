# Evaluates nix/host.nix, nix/guest.nix (through the flake), nix/package.nix
# and flake.nix against the stubs and returns what the Go test
# (provision/nix_test.go) checks. stubBin is a directory with bin/virsh and
# bin/nixvm-image, so the generated unit scripts can be run against fakes.
#
# pkgs.writeShellApplication is a real derivation here, as in nixpkgs: the
# script with errexit/nounset/pipefail and runtimeInputs on PATH, in
# $out/bin/NAME, checked with shellcheck when it is built (the test realises
# the derivations listed in `drvs`). Run:
#   nix-instantiate --eval --strict --json --read-write-mode \
#     testdata/nix-stubs/eval.nix --argstr stubBin /tmp/x
{ stubBin ? "/nonexistent" }:
let
  b = builtins;
  # In the store, so the same fakes give the same derivations: they are
  # built (and shellchecked) once.
  stubs = b.path { path = stubBin; name = "nixvm-test-stubs"; };
  lib = import ./lib.nix;
  # libvirt and nixvm-image are stubBin (bin/virsh, bin/nixvm-image: fakes
  # the test runs); other packages only have a name.
  pkg = name: { outPath = stubs; inherit name; };
  fake = name: { outPath = "/stub/${name}"; inherit name; };
  pkgsFor = system: rec {
    inherit lib;
    stdenv.hostPlatform.system = system;
    writeText = name: text: b.toFile name text;
    writeShellScript = name: text: b.toFile name "#!/bin/sh\n${text}";
    writeShellScriptBin = name: text: { outPath = b.toFile name "#!/bin/sh\n${text}"; inherit name; };
    writeShellApplication = { name, text, runtimeInputs ? [ ] }:
      b.derivation {
        inherit name;
        system = b.currentSystem;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        passAsFile = [ "script" ];
        script = ''
          #!/bin/bash
          set -o errexit
          set -o nounset
          set -o pipefail

          export PATH="${lib.makeBinPath runtimeInputs}:$PATH"

          ${text}
        '';
        args = [ "-e" "-c" ''
          mkdir -p $out/bin
          cp "$scriptPath" $out/bin/${name}
          chmod +x $out/bin/${name}
          bash -n $out/bin/${name}
          shellcheck $out/bin/${name}
        '' ];
      } // { meta.mainProgram = name; };
    buildGoModule = a: a // { inherit system; };
    # As nixpkgs' callPackage: the function's arguments from this set.
    callPackage = f: args: let fn = import f; in fn (b.intersectAttrs (b.functionArgs fn) pkgs // args);
    pkgs = pkgsFor system;
    makeWrapper = fake "makeWrapper";
    qemu_kvm = fake "qemu_kvm";
    xz = fake "xz";
    openssh = fake "openssh";
    nixfmt = fake "nixfmt";
    runCommand = name: env: script: { inherit name env script; };
    coreutils = fake "coreutils";
    gnused = fake "gnused";
    gnugrep = fake "gnugrep";
    lvm2 = fake "lvm2";
  };
  # nixos/lib/utils.nix's quoting of Exec* arguments: JSON strings, % and $
  # doubled.
  utils = rec {
    escapeSystemdExecArg = arg: b.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (b.toJSON (toString arg));
    escapeSystemdExecArgs = l: b.concatStringsSep " " (map escapeSystemdExecArg l);
  };
  pkgs = pkgsFor "x86_64-linux";
  evalHost = { guests, domainType ? "kvm" }: import ./eval-module.nix {
    inherit lib pkgs utils;
    module = import ../../nix/host.nix;
    outside.virtualisation.libvirtd = { package = pkg "libvirt"; qemu.package = fake "qemu"; };
    userConfig.services.nixvm = {
      enable = true;
      package = pkg "nixvm-image";
      inherit guests domainType;
    };
  };
  host = evalHost {
    guests = {
      some-athens-guest = {
        memory = 4096;
        diskSize = "50G";
        mac = "D2:91:69:C0:14:9A";
        disk = { type = "device"; path = "/dev/vg/guest-some-athens-guest"; };
        network = { type = "direct"; source = "enp30s0"; };
      };
      web1 = { memory = 2048; diskSize = "20G"; mac = "52:54:00:00:00:01"; shutdownTimeout = 2; };
      ci1 = { memory = 1024; diskSize = "20G"; mac = "52:54:00:00:00:02"; disk.type = "overlay"; autostart = false; firmware = "efi"; restartIfChanged = true; };
    };
  };
  d = host.definitions;
  units = d.systemd.services;
  drvsOf = s: b.attrNames (b.getContext s);
  unitOut = u: {
    wantedBy = u.wantedBy or [ ];
    inherit (u) after;
    requires = u.requires or [ ];
    restartIfChanged = u.restartIfChanged or true;
    path = map (p: p.name) (u.path or [ ]);
    serviceConfig = u.serviceConfig;
    drvs = lib.concatMap (k: if u.serviceConfig ? ${k} then drvsOf u.serviceConfig.${k} else [ ]) [ "ExecStartPre" "ExecStart" "ExecStop" ];
  };

  # Every domain XML the module can write: each disk type, network type and
  # firmware, for both domain types (guest name -> the XML file).
  matrix = domainType:
    let
      guests = b.listToAttrs (lib.concatMap (disk: lib.concatMap (net: map (fw: {
        name = "m-${disk}-${net}-${fw}";
        value = {
          memory = 512;
          diskSize = "10G";
          mac = "52:54:00:12:34:56";
          disk = { type = disk; } // lib.optionalAttrs (disk == "device") { path = "/dev/vg0/m"; };
          network = { type = net; source = if net == "direct" then "enp30s0" else if net == "bridge" then "br0" else "default"; };
          firmware = fw;
          extraDevices = ''<rng model="virtio"><backend model="random">/dev/urandom</backend></rng>'';
        };
      }) [ "bios" "efi" ]) [ "direct" "bridge" "network" ]) [ "pool" "device" "file" "overlay" ]);
    in
    b.mapAttrs (n: u: domainXML (b.head (drvsOf u.serviceConfig.ExecStartPre)))
      (lib.filterAttrs (n: u: u.serviceConfig ? ExecStartPre) (evalHost { inherit guests domainType; }).definitions.systemd.services);
  # The domain XML a start script defines, read from its derivation.
  domainXML = drv:
    let m = b.match ".*(/nix/store/[a-z0-9]+-nixvm-guest-[^ \"\\]*[.]xml).*" (b.readFile drv); in
    if m == null then throw "no domain XML in ${drv}" else b.head m;

  failedAssertions = e: map (a: a.message) (b.filter (a: !a.assertion) e.definitions.assertions);
  noPath = evalHost { guests.nopath = { memory = 1; diskSize = "1G"; mac = "52:54:00:00:00:09"; disk.type = "device"; }; };
  badName = name: !(b.tryEval (b.deepSeq (evalHost { guests.${name} = { memory = 1; diskSize = "1G"; mac = "52:54:00:00:00:09"; }; }).config.services.nixvm.guests null)).success;

  flake = import ../../flake.nix;
  flakeOut = flake.outputs {
    self = flakeOut // { outPath = toString ../..; };
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
    };
  };
  flakeModules = system: {
    host = flakeOut.nixosModules.host { inherit lib; pkgs = pkgsFor system; };
    guest = flakeOut.nixosModules.guest { inherit lib; pkgs = pkgsFor system; };
  };
  overlaid = flakeOut.overlays.default pkgs pkgs;
  describe = p: {
    inherit (p) pname version subPackages vendorHash doCheck ldflags system;
    cgo = p.env.CGO_ENABLED;
    srcName = p.src.name;
    license = p.meta.license.spdxId;
    mainProgram = p.meta.mainProgram;
    postInstall = p.postInstall or "";
    allowedReferences = p.allowedReferences or null;
  };
in
{
  stubs = "${stubs}";
  units = b.mapAttrs (n: unitOut) units;
  timers = d.systemd.timers;
  tmpfiles = d.systemd.tmpfiles.rules;
  libvirtd = d.virtualisation.libvirtd.enable;
  systemPackages = map (p: p.name) d.environment.systemPackages;
  orphans = lib.getExe (b.elemAt d.environment.systemPackages 1);
  orphansDrvs = drvsOf (lib.getExe (b.elemAt d.environment.systemPackages 1));
  guests = host.config.services.nixvm.guests;
  assertions = failedAssertions host;
  noPathAssertions = failedAssertions noPath;
  badNames = b.filter badName [ "a/b" "../x" "-dash" "with space" "x;y" "" (lib.concatStringsSep "" (b.genList (_: "a") 64)) ];
  goodNames = b.filter (n: !(badName n)) [ "web1" "db.example" "a_b-c" (lib.concatStringsSep "" (b.genList (_: "a") 63)) ];
  matrix = { kvm = matrix "kvm"; qemu = matrix "qemu"; };
  packages = b.mapAttrs (system: ps: b.mapAttrs (n: describe) ps) flakeOut.packages;
  flake = {
    systems = b.attrNames flakeOut.packages;
    nixosModules = b.attrNames flakeOut.nixosModules;
    checks = b.mapAttrs (system: c: b.attrNames c) flakeOut.checks;
    formatter = b.mapAttrs (system: f: f.name) flakeOut.formatter;
    overlay = b.mapAttrs (n: describe) overlaid;
    modules = b.mapAttrs (system: m: {
      hostImports = map toString m.host.imports;
      guestImports = map toString m.guest.imports;
      hostPackage = describe m.host.services.nixvm.package;
      guestPackage = describe m.guest.nixvm.resize.package;
    }) (lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] flakeModules);
  };
}
