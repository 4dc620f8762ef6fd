# The image plumbing that nixvm-image adds to the NixOS configuration it
# builds (`nixvm-image build CONFIG.nix`, `--flake`). The build sets
# nixvm.layout from --layout; everything else can be overridden.
#
#   - the root file system by label "nixos" (the image's ext4 label);
#   - GRUB on /dev/vda for the legacy layouts, systemd-boot for efi (hybrid:
#     GRUB for BIOS, with the ESP mounted at /boot);
#   - the virtio modules in the initrd;
#   - nixvm-resize on first boot: after -.mount, before systemd-growfs-root,
#     it grows the root partition and file system to the disk's size. Its
#     package comes from nixvm.package, so the module evaluates without the
#     nixvm-image flake; with nixvm.package = null the unit is left out.
{ config, lib, pkgs, ... }:
let
  cfg = config.nixvm;
  efi = cfg.layout == "efi";
  hasESP = cfg.layout == "efi" || cfg.layout == "hybrid";
in
{
  options.nixvm = {
    layout = lib.mkOption {
      type = lib.types.enum [ "legacy" "legacy+gpt" "efi" "hybrid" ];
      default = "legacy";
      description = "The image's partition layout (nixvm-image build --layout).";
    };
    package = lib.mkOption {
      type = lib.types.nullOr lib.types.package;
      default = null;
      description = "The package providing bin/nixvm-resize, run on first boot; null leaves the unit out.";
    };
  };

  config = lib.mkMerge [
    {
      fileSystems."/" = {
        device = "/dev/disk/by-label/nixos";
        fsType = "ext4";
      };
      boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_scsi" "virtio_net" "ext4" ];
      boot.growPartition = lib.mkDefault false; # nixvm-resize does this
    }
    (lib.mkIf (!efi) {
      boot.loader.grub.enable = lib.mkDefault true;
      boot.loader.grub.device = lib.mkDefault "/dev/vda";
    })
    (lib.mkIf efi {
      boot.loader.grub.enable = lib.mkDefault false;
      boot.loader.systemd-boot.enable = lib.mkDefault true;
      boot.loader.efi.canTouchEfiVariables = lib.mkDefault false;
    })
    (lib.mkIf hasESP {
      fileSystems."/boot" = {
        device = "/dev/disk/by-label/ESP";
        fsType = "vfat";
      };
      boot.initrd.availableKernelModules = [ "vfat" "nls_cp437" "nls_iso8859-1" ];
    })
    (lib.mkIf (cfg.package != null) {
      systemd.services.nixvm-resize = {
        description = "Grow the root partition and file system to the disk (nixvm-resize)";
        wantedBy = [ "local-fs.target" ];
        after = [ "-.mount" ];
        before = [ "systemd-growfs-root.service" "local-fs.target" ];
        unitConfig.DefaultDependencies = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${cfg.package}/bin/nixvm-resize --mountpoint /";
        };
      };
    })
  ];
}
