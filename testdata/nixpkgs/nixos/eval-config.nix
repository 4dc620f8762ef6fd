# evalConfig modules -> { config; system; extendModules }: the fake NixOS
# evaluation (see ../README.md). As NixOS does, building the system fails
# when an assertion (config.assertions) fails. It also fails unless the
# configuration has what nixvm-image's guest module sets (a root file system,
# virtio_blk in the initrd, a boot loader for nixvm.layout), so a test shows
# that the build added the module. config.system.build.toplevel is ./system.nix
# made from the configuration: its boot loader and its first-boot units.
let
  lib = import ../lib.nix;
  fake = { lib, ... }: {
    options.fixture.variant = lib.mkOption { type = lib.types.str; default = "ok"; };
    options.assertions = lib.mkOption { type = lib.types.listOf lib.types.attrs; default = [ ]; };
  };
  evalConfig = modules:
    let
      eval = lib.evalModules { modules = [ fake ] ++ modules; };
      config = eval.config;
      layout = config.nixvm.layout or "(unset)";
      grub = config.boot.loader.grub or { };
      sdboot = config.boot.loader.systemd-boot.enable or false;
      checks = [
        { ok = config ? fileSystems."/".device; what = "a root file system (fileSystems.\"/\")"; }
        { ok = builtins.elem "virtio_blk" (config.boot.initrd.availableKernelModules or [ ]); what = "virtio_blk in the initrd"; }
        {
          ok =
            if layout == "efi" then sdboot && !(grub.enable or true)
            else if layout == "hybrid" then (grub.enable or false) && grub.device or null == "/dev/vda" && (grub.efiSupport or false) && (grub.efiInstallAsRemovable or false)
            else (grub.enable or false) && grub.device or null == "/dev/vda";
          what = "the boot loader for layout ${layout}";
        }
      ];
      failed = builtins.filter (c: !c.ok) checks;
      failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
      system =
        if failedAssertions != [ ] then
          throw "\nFailed assertions:\n${builtins.concatStringsSep "\n" (map (m: "- ${m}") failedAssertions)}"
        else if failed != [ ] then
          throw "fake nixpkgs: the configuration lacks ${(builtins.head failed).what}: nixvm-image's guest module was not added"
        else
          import ./system.nix { inherit config; };
    in
    {
      config = config // { system.build.toplevel = system; };
      inherit system;
      extendModules = extra: evalConfig (modules ++ (extra.modules or [ ]));
    };
in
evalConfig
