# The flake's NixOS configuration. It imports the guest module itself (the
# test copies nix/guest.nix here as nixvm-guest.nix, as a flake that vendors
# or imports nixosModules.guest would), so `nixvm-image build --flake` adds
# it a second time. The host name says whether the flake's source holds
# old-image.qcow2, which the test leaves untracked: a git flake must not.
{ ... }:
{
  imports = [ ./nixvm-guest.nix ];
  networking.hostName = if builtins.pathExists ./old-image.qcow2 then "flake-saw-untracked" else "flake-clean";
}
