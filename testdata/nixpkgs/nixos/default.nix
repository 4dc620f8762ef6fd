# Fake '<nixpkgs/nixos>' (see ../README.md): evaluates the configuration with
# the small module system of ../lib.nix and builds the bootable fixture. It
# refuses configurations that lack what nixvm-image's guest module sets.
{ configuration ? import <nixos-config>, system ? builtins.currentSystem }:
let
  lib = import ../lib.nix;
  fake = { lib, ... }: {
    options.fixture.variant = lib.mkOption { type = lib.types.str; default = "ok"; };
  };
  eval = lib.evalModules { modules = [ fake configuration ]; };
  config = eval.config;
  layout = config.nixvm.layout or "(unset)";
  legacy = layout != "efi";
  checks = [
    { ok = (config.fileSystems."/".device or null) == "/dev/disk/by-label/nixos"; what = "fileSystems./ by label nixos"; }
    { ok = builtins.elem "virtio_blk" (config.boot.initrd.availableKernelModules or [ ]); what = "virtio_blk in the initrd"; }
    { ok = if legacy then (config.boot.loader.grub.enable or false) && (config.boot.loader.grub.device or null) == "/dev/vda" else (config.boot.loader.systemd-boot.enable or false) && !(config.boot.loader.grub.enable or true); what = "the boot loader for layout ${layout}"; }
  ];
  failed = builtins.filter (c: !c.ok) checks;
in
if failed != [ ] then
  throw "fake nixpkgs: the configuration lacks ${(builtins.head failed).what}: nixvm-image's guest module was not added"
else {
  inherit config;
  system = import ../../fixture/bootable.nix { variant = config.fixture.variant; };
}
