# evalConfig modules -> { config; system; extendModules } : the fake NixOS
# evaluation (see ../README.md). config.system.build.toplevel is the bootable
# fixture, with the variant from the option fixture.variant; evaluation fails
# unless the configuration has what nixvm-image's guest module sets.
let
  lib = import ../lib.nix;
  fake = { lib, ... }: {
    options.fixture.variant = lib.mkOption { type = lib.types.str; default = "ok"; };
  };
  evalConfig = modules:
    let
      eval = lib.evalModules { modules = [ fake ] ++ modules; };
      config = eval.config;
      layout = config.nixvm.layout or "(unset)";
      legacy = layout != "efi";
      checks = [
        { ok = (config.fileSystems."/".device or null) == "/dev/disk/by-label/nixos"; what = "fileSystems./ by label nixos"; }
        { ok = builtins.elem "virtio_blk" (config.boot.initrd.availableKernelModules or [ ]); what = "virtio_blk in the initrd"; }
        { ok = if legacy then (config.boot.loader.grub.enable or false) && (config.boot.loader.grub.device or null) == "/dev/vda" else (config.boot.loader.systemd-boot.enable or false) && !(config.boot.loader.grub.enable or true); what = "the boot loader for layout ${layout}"; }
      ];
      failed = builtins.filter (c: !c.ok) checks;
      system =
        if failed != [ ] then
          throw "fake nixpkgs: the configuration lacks ${(builtins.head failed).what}: nixvm-image's guest module was not added"
        else
          import ../../fixture/bootable.nix { variant = config.fixture.variant; };
    in
    {
      config = config // { system.build.toplevel = system; };
      inherit system;
      extendModules = extra: evalConfig (modules ++ (extra.modules or [ ]));
    };
in
evalConfig
