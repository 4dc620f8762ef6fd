# nixvm-resize alone: the first-boot growth a guest's closure carries (the
# guest module's nixvm.resize.package), a few MB, static, referring to no
# other store path.
{ lib, buildGoModule }:
let
  source = import ./source.nix { inherit lib; };
in
buildGoModule {
  pname = "nixvm-resize";
  inherit (source) version src vendorHash ldflags;

  subPackages = [ "cmd/nixvm-resize" ];

  env.CGO_ENABLED = "0";
  # A guest carries it: nothing else may come along.
  allowedReferences = [ ];
  doCheck = false;

  meta = source.meta // {
    description = "Grow the root partition and its ext4 to the end of the disk at boot (nixvm-image's first-boot growth)";
    mainProgram = "nixvm-resize";
  };
}
