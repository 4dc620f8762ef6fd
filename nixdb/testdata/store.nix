# Store paths for the nixdb tests, built with the local Nix only:
# nix-build store.nix --argstr salt S --option substituters '' \
#   --option sandbox false --no-out-link -A top
# `salt` makes each test run's paths new.
{ salt ? "0" }:
let
  mk = (import ../../testdata/fixture/lib.nix).salted salt;
in rec {
  lib = mk "lib" ''
    mkdir -p $out/lib/empty; echo library > $out/lib/libx.so; chmod +x $out/lib/libx.so
    ln -s libx.so $out/lib/libx.so.1
  '' {};
  data = mk "data" "echo data > $out" {};
  app = mk "app" "mkdir -p $out/bin; printf '#!/bin/sh\\n# %s\\n' $lib > $out/bin/app; chmod +x $out/bin/app" { inherit lib; };
  # References app, data and itself.
  top = mk "top" "mkdir $out; echo $app $data $out > $out/refs" { inherit app data; };
}
