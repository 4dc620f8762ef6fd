# Evaluates nix/pull.nix (services.nixvm.images) against the stubs, with the
# services.nixvm options host.nix declares stubbed; publish/nix_test.go
# checks the units and timers. Run:
#   nix-instantiate --eval --strict --json testdata/nix-stubs/eval-pull.nix
let
  lib = import ./lib.nix;
  pkgs = { inherit lib; };
  pull = import ../../nix/pull.nix;
  # host.nix's own options, as the real module system would merge them.
  module = args: pull (args // {
    config = args.config // {
      services.nixvm = args.config.services.nixvm // { enable = true; package = { outPath = "/nixvm"; name = "nixvm-image"; }; };
    };
  });
  host = import ./eval-module.nix {
    inherit lib pkgs module;
    userConfig.services.nixvm.images = {
      baseline = { source = "s3://images/nixvm"; interval = "15min"; link = "/etc/virt/base-images/baseline.qcow2"; endpoint = "http://minio.lan:9000"; environmentFile = "/etc/nixvm/s3.env"; };
      web = { source = "https://cache.example/nixvm"; trust = [ "nixvm-image ed25519 public AAAA" ]; };
    };
  };
in
{
  units = host.definitions.systemd.services;
  timers = host.definitions.systemd.timers;
}
