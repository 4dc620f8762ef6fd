# A user's NixOS configuration for `nixvm-image build CONFIG.nix` tests,
# evaluated by the fake <nixpkgs/nixos> in ../nixpkgs.
{ config, lib, pkgs, ... }:
{
  networking.hostName = "baseline";
  services.openssh.enable = true;
  boot.initrd.availableKernelModules = [ "ahci" ];
}
