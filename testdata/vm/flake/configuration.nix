{ ... }:
{
  networking.hostName = "baseline-flake";
}
