# services.nixvm.images.<name>: pull an image's published generations on a
# timer (nixvm-image pull, see `nixvm-image pull --help`) into the host image
# store that push fills: new generation, `current` swapped, link set, exactly
# as after a push. Imported by host.nix; needs services.nixvm.enable.
#
#   services.nixvm.images.baseline.source = "s3://images/nixvm";
#   services.nixvm.images.baseline.interval = "15min";
#
# S3 credentials: put AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… (or
# AWS_PROFILE=… with a shared credentials file) into environmentFile.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixvm;
  inherit (lib) mkOption types;

  imageModule = { name, ... }: {
    options = {
      source = mkOption {
        type = types.str;
        example = "https://cache.example/nixvm";
        description = "Where ${name} is published: http(s)://…, s3://BUCKET/PREFIX or file:///DIR.";
      };
      interval = mkOption {
        type = types.str;
        default = "15min";
        description = "Time between pulls (systemd OnUnitActiveSec).";
      };
      link = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/etc/virt/base-images/${name}.qcow2";
        description = "Also point this path at the current generation.";
      };
      trust = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "nixvm-image ed25519 public …" ];
        description = "ed25519 public keys (publish --gen-key's .pub line); when set, only generations signed by one of them are installed.";
      };
      endpoint = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://minio.lan:9000";
        description = "S3 endpoint for non-AWS stores.";
      };
      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "systemd EnvironmentFile with the S3 credentials (kept out of the Nix store).";
      };
    };
  };

  pullArgs = name: i:
    [ "pull" i.source "--name" name "--store-dir" "/var/lib/nixvm-image/images" ]
    ++ lib.optional (i.link != null) "--link=${i.link}"
    ++ lib.concatMap (k: [ "--trust" k ]) i.trust
    ++ lib.optional (i.endpoint != null) "--endpoint=${i.endpoint}";
in
{
  options.services.nixvm.images = mkOption {
    type = types.attrsOf (types.submodule imageModule);
    default = { };
    description = "Images pulled from a publication (nixvm-image publish): one timer nixvm-image-pull-NAME each.";
  };

  config = lib.mkIf cfg.enable {
    systemd.services = lib.mapAttrs' (name: i: lib.nameValuePair "nixvm-image-pull-${name}" {
      description = "Pull the newest published generation of image ${name}";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${cfg.package}/bin/nixvm-image ${lib.escapeShellArgs (pullArgs name i)}";
      } // lib.optionalAttrs (i.environmentFile != null) { EnvironmentFile = i.environmentFile; };
    }) cfg.images;

    systemd.timers = lib.mapAttrs' (name: i: lib.nameValuePair "nixvm-image-pull-${name}" {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = "1min";
        OnUnitActiveSec = i.interval;
        RandomizedDelaySec = "1min"; # hosts of a fleet do not all ask at once
      };
    }) cfg.images;
  };
}
