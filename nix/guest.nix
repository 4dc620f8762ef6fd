# The image plumbing for a NixOS guest built by nixvm-image. `nixvm-image
# build CONFIG.nix` and `--flake` add it to the configuration (and set
# nixvm.layout from --layout); a flake can import it itself as
# nixosModules.guest, and `--toplevel` then builds a system that already has
# it. Importing it twice is harmless: the module has a `key`, so the module
# system keeps one copy.
#
#   - The root file system by label: the image's ext4 is labelled "nixos" and
#     its ESP (efi, hybrid) "ESP". fileSystems."/" and "/boot" are defaults
#     (mkDefault), so a configuration with its own root device wins; it must
#     then name the image's file system. To use another label, relabel it in
#     the guest (e2label /dev/vda1 NAME, or fatlabel for the ESP), set
#     fileSystems."/".device = "/dev/disk/by-label/NAME", and switch.
#   - The boot loader for the layout: GRUB on /dev/vda for legacy and
#     legacy+gpt; systemd-boot for efi; for hybrid GRUB for both BIOS (on
#     /dev/vda) and UEFI (installed as the removable EFI/BOOT/BOOTX64.EFI,
#     which firmware finds without NVRAM entries), with the ESP at /boot.
#   - The virtio modules in the initrd.
#   - First-boot growth, on by default: the nixvm-resize unit runs after
#     -.mount and before systemd-growfs-root, and grows the root partition and
#     its ext4 to the disk's size (a no-op once done). Its package is
#     nixvm.resize.package: the flake's nixosModules.guest sets it to the
#     flake's nixvm-resize, overlays.default provides pkgs.nixvm-resize, and
#     nixvm-image build puts its own static nixvm-resize in when the
#     configuration gives none. nixvm.resize.enable = false leaves it out.
{ config, lib, pkgs, ... }:
let
  cfg = config.nixvm;
  hasESP = cfg.layout == "efi" || cfg.layout == "hybrid";
in
{
  key = "github:nixvm-image/nixvm-image/nix/guest.nix";

  options.nixvm = {
    layout = lib.mkOption {
      type = lib.types.enum [ "legacy" "legacy+gpt" "efi" "hybrid" ];
      default = "legacy";
      description = ''
        The image's partition layout (nixvm-image build --layout, which sets
        this option): it chooses the boot loader.
      '';
    };
    resize = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Grow the root partition and its ext4 file system to the end of the
          disk at boot (nixvm-resize: first boot, and any boot after the disk
          grew). Disable for root file systems the guest manages otherwise.
        '';
      };
      package = lib.mkOption {
        type = lib.types.nullOr lib.types.package;
        default = pkgs.nixvm-resize or null;
        defaultText = lib.literalExpression "pkgs.nixvm-resize or null";
        description = ''
          The package providing bin/nixvm-resize (static, a few MB). The
          flake's nixosModules.guest sets the flake's nixvm-resize;
          `nixvm-image build` sets its own when nothing else does.
        '';
      };
    };
  };

  config = lib.mkMerge [
    {
      assertions = [
        {
          assertion = !cfg.resize.enable || cfg.resize.package != null;
          message = ''
            nixvm.resize.enable is true but nixvm.resize.package is null: first-boot
            growth needs nixvm-resize. Import the nixvm-image flake's nixosModules.guest
            (it sets the package), apply its overlays.default (pkgs.nixvm-resize), set
            nixvm.resize.package, or set nixvm.resize.enable = false.
          '';
        }
      ];
      fileSystems."/" = {
        device = lib.mkDefault "/dev/disk/by-label/nixos";
        fsType = lib.mkDefault "ext4";
      };
      boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_scsi" "virtio_net" "ext4" ];
      boot.growPartition = lib.mkDefault false; # nixvm-resize does this
    }
    (lib.mkIf (cfg.layout != "efi") {
      boot.loader.grub.enable = lib.mkDefault true;
      boot.loader.grub.device = lib.mkDefault "/dev/vda";
    })
    (lib.mkIf (cfg.layout == "hybrid") {
      boot.loader.grub.efiSupport = lib.mkDefault true;
      boot.loader.grub.efiInstallAsRemovable = lib.mkDefault true;
      boot.loader.efi.canTouchEfiVariables = lib.mkDefault false;
    })
    (lib.mkIf (cfg.layout == "efi") {
      boot.loader.grub.enable = lib.mkDefault false;
      boot.loader.systemd-boot.enable = lib.mkDefault true;
      boot.loader.efi.canTouchEfiVariables = lib.mkDefault false;
    })
    (lib.mkIf hasESP {
      fileSystems."/boot" = {
        device = lib.mkDefault "/dev/disk/by-label/ESP";
        fsType = lib.mkDefault "vfat";
      };
      boot.initrd.availableKernelModules = [ "vfat" "nls_cp437" "nls_iso8859-1" ];
    })
    (lib.mkIf (cfg.resize.enable && cfg.resize.package != null) {
      systemd.services.nixvm-resize = {
        description = "Grow the root partition and file system to the disk (nixvm-resize)";
        wantedBy = [ "local-fs.target" ];
        after = [ "-.mount" ];
        before = [ "systemd-growfs-root.service" "local-fs.target" ];
        unitConfig.DefaultDependencies = false;
        # Nothing to restart on a switch: it runs at boot.
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${cfg.resize.package}/bin/nixvm-resize --mountpoint /";
        };
      };
    })
  ];
}
