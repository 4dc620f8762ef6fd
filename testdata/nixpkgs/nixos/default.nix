# Fake '<nixpkgs/nixos>' (see ../README.md): evaluates the configuration with
# the small module system of ../lib.nix and builds the bootable fixture.
{ configuration ? import <nixos-config>, system ? builtins.currentSystem }:
let r = import ./eval-config.nix [ configuration ]; in
{ inherit (r) config system; }
