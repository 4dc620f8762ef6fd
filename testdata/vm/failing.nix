# Like baseline.nix, but the system's switch-to-configuration fails.
{ ... }:
{
  imports = [ ./baseline.nix ];
  fixture.variant = "fail";
}
