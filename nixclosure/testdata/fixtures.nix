# Small store paths for the nixclosure tests, built with the local Nix only
# (no nixpkgs): nix-build fixtures.nix --option substituters '' \
#   --option sandbox false --no-out-link -A <attr>
# `salt` makes the test's paths its own, so a stale store cannot hide a bug.
{ salt ? "0" }:
let
  mk = (import ../../testdata/fixture/lib.nix).salted salt;
in rec {
  # Files of many sizes (padding), executables, symlinks, empty and nested
  # directories, names whose byte order differs from other orders.
  tree = mk "tree" ''
    mkdir -p $out/dir/sub/deeper $out/empty $out/Upper $out/a.b $out/a-b
    : > $out/emptyfile
    printf 1 > $out/one
    printf 12345678 > $out/eight
    printf 123456789 > $out/nine
    head -c 10000 /bin/sh > $out/dir/sub/deeper/blob
    echo '#!/bin/sh' > $out/dir/run; chmod 0755 $out/dir/run
    echo exe > $out/Upper/x; chmod +x $out/Upper/x
    echo z > $out/a.b/z; echo y > $out/a-b/y; echo Z > $out/Z
    ln -s dir/run $out/link
    ln -s /nonexistent/target/with/a/long/name $out/dir/dangling
    ln -s . $out/empty/self
  '' {};
  # A single regular file as the whole output.
  file = mk "file" "echo just a file > $out" {};
  # An executable single file.
  script = mk "script" "echo '#!/bin/sh' > $out; chmod +x $out" {};
  # A symlink as the whole output; it references tree.
  link = mk "link" "ln -s $tree $out" { inherit tree; };
  # References tree and file, and itself.
  top = mk "top" "mkdir $out; echo $tree $file > $out/refs; echo $out > $out/self; ln -s $link $out/l" { inherit tree file link; };
  # exportReferencesGraph, text form.
  graph = mk "graph" "cp closure $out" { exportReferencesGraph = [ "closure" top ]; };
  # exportReferencesGraph, structured attrs: Nix passes no environment but
  # writes .attrs.json (one line, with outputs.out) into the build directory.
  # (/bin/sh, not bash: bash builders were killed with signal 9 now and then.)
  sgraph = builtins.derivation {
    name = "sgraph";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    __structuredAttrs = true;
    exportReferencesGraph.closure = [ top ];
    args = [ "-c" "PATH=/usr/bin:/bin; o=$(sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); cp .attrs.json $o" ];
  };
}
