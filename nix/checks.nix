# The flake's checks of the modules, evaluated with real nixpkgs (`nix flake
# check`); the repository's Go tests check the same against stubs, without
# nixpkgs (provision/nix_test.go, cmd/nixvm-image/nixos_test.go).
#
#   guest-module  nixosModules.guest plus a second copy of nix/guest.nix at
#                 another path (as `nixvm-image build` adds it), with the
#                 configuration's own root device and --layout hybrid: it
#                 evaluates, keeps that root, asks GRUB for BIOS and for
#                 removable UEFI, and has the nixvm-resize unit.
#   host-module   three guests (SeaBIOS and OVMF, every disk and network
#                 kind): no unit restarts on a rebuild, and each domain XML
#                 its start script defines passes libvirt's virt-xml-validate.
{ self, nixpkgs, pkgs }:
let
  inherit (pkgs) lib;
  nixos = modules: (nixpkgs.lib.nixosSystem {
    inherit (pkgs.stdenv.hostPlatform) system;
    modules = modules ++ [{ system.stateVersion = lib.trivial.release; }];
  }).config;
  unitFile = config: name: "${config.systemd.units.${name}.unit}/${name}";
  root = "/dev/disk/by-uuid/0f3c5b8e-0000-4000-8000-000000000001";

  guest = nixos [
    self.nixosModules.guest
    (builtins.toFile "vendored-guest.nix" (builtins.readFile ./guest.nix))
    {
      nixvm.layout = "hybrid";
      fileSystems."/" = { device = root; fsType = "ext4"; };
    }
  ];

  host = nixos [
    self.nixosModules.host
    {
      boot.loader.grub.device = "nodev";
      fileSystems."/".device = "/dev/vda1";
      services.nixvm.enable = true;
      services.nixvm.guests = {
        bios = { memory = 1024; diskSize = "20G"; mac = "52:54:00:00:00:01"; };
        efi = {
          memory = 1024; diskSize = "20G"; mac = "52:54:00:00:00:02"; firmware = "efi";
          disk.type = "overlay";
          network = { type = "bridge"; source = "br0"; };
        };
        dev = {
          memory = 1024; diskSize = "20G"; mac = "52:54:00:00:00:03";
          disk = { type = "device"; path = "/dev/vg0/dev"; };
          network = { type = "direct"; source = "eth0"; };
        };
      };
    }
  ];
in
{
  guest-module = pkgs.runCommand "nixvm-guest-module-check"
    {
      unit = unitFile guest "nixvm-resize.service";
      root = guest.fileSystems."/".device;
      grub = lib.boolToString (guest.boot.loader.grub.enable && guest.boot.loader.grub.efiSupport && guest.boot.loader.grub.efiInstallAsRemovable);
    } ''
    grep -q '^ExecStart=.*/bin/nixvm-resize --mountpoint /$' "$unit"
    [ "$root" = ${root} ]
    [ "$grub" = true ]
    touch $out
  '';

  host-module = pkgs.runCommand "nixvm-host-module-check"
    {
      nativeBuildInputs = [ pkgs.libvirt pkgs.libxml2 ];
      units = map (n: unitFile host "nixvm-guest-${n}.service") [ "bios" "efi" "dev" ];
    } ''
    efi=0
    for u in $units; do
      grep -q '^X-RestartIfChanged=false$' "$u"
      start=$(sed -n 's/^ExecStartPre="\([^"]*\)"$/\1/p' "$u")
      [ -x "$start" ]
      for xml in $(grep -o '/nix/store/[^ "]*\.xml' "$start" | sort -u); do
        sed 's/@UUID@/0f3c5b8e-0000-4000-8000-000000000001/' "$xml" > domain.xml
        virt-xml-validate domain.xml domain
        sed '/@UUID@/d' "$xml" > domain.xml
        virt-xml-validate domain.xml domain
        if grep -q 'firmware="efi"' "$xml"; then efi=$((efi + 1)); fi
      done
    done
    [ $efi = 1 ]
    touch $out
  '';
}
