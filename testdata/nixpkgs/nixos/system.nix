# The fake NixOS toplevel of an evaluated configuration (see ../README.md):
# the bootable fixture (../../fixture/bootable.nix: kernel, busybox initrd
# that mounts the file system labelled nixos, modules), with two parts made
# from the configuration, as NixOS makes them:
#
#   init    stage 2: remounts / read-write, mounts /proc, /sys, /dev, then
#           runs the ExecStart of every systemd service wanted by
#           local-fs.target (then multi-user.target), the way systemd would
#           at boot, and reports on the console:
#             @@fake-nixos boot SYSTEM df_kib=N
#             @@fake-nixos unit NAME rc=N
#             @@fake-nixos done df_kib=N
#           then powers off.
#   bin/switch-to-configuration boot
#           ../../fixture/bootloader.nix with what boot.loader.* ask for:
#           GRUB i386-pc on grub.device, GRUB x86_64-efi with efiSupport
#           (EFI/BOOT/BOOTX64.EFI with efiInstallAsRemovable, else
#           EFI/NixOS-boot/grubx64.efi, which firmware finds only through an
#           NVRAM entry), systemd-boot with systemd-boot.enable.
#           fixture.variant = "fail" makes it fail, "hang" hang.
#   etc/fstab
#           fileSystems as DEVICE MOUNTPOINT TYPE lines.
#
# GRUB x86_64-efi comes from the host's Debian grub-efi-amd64-bin.
{ config }:
let
  f = import ../../fixture/lib.nix;
  inherit (builtins) concatStringsSep filter attrNames elem;
  base = import ../../fixture/bootable.nix { };
  variant = config.fixture.variant;
  grub = config.boot.loader.grub or { };
  grubEnable = grub.enable or false;
  efiSupport = grubEnable && (grub.efiSupport or false);
  hostName = config.networking.hostName or "nixos";
  # As NixOS writes /etc/fstab: every file system's device and type.
  fileSystems = config.fileSystems or { };
  fstab = concatStringsSep "\n" (map (m: "${fileSystems.${m}.device} ${m} ${fileSystems.${m}.fsType or "auto"}") (attrNames fileSystems));

  services = config.systemd.services or { };
  wantedBy = target: filter
    (n: elem target (services.${n}.wantedBy or [ ]) && (services.${n}.enable or true) && services.${n} ? serviceConfig.ExecStart)
    (attrNames services);
  units = wantedBy "local-fs.target" ++ filter (n: !(elem n (wantedBy "local-fs.target"))) (wantedBy "multi-user.target");
  runUnits = concatStringsSep "\n" (map (n: ''
    ${services.${n}.serviceConfig.ExecStart}
    echo "@@fake-nixos unit ${n} rc=\$?"
  '') units);

  grubEfi = f.run "grub-2.06-x86_64-efi" ''
    mkdir -p $out/lib/grub
    cp -r /usr/lib/grub/x86_64-efi $out/lib/grub/
  '' { };

  failure = if variant == "fail" then ''
    echo "switch-to-configuration: simulated failure: cannot install the boot loader" >&2
    exit 3
  '' else if variant == "hang" then ''
    echo "switch-to-configuration: hanging on purpose"
    ${base.passthru.bb} sleep 100000
  '' else "";
in
f.run "nixos-system-${hostName}-fake" ''
  mkdir -p $out
  cp -a ${base}/. $out/
  chmod -R u+w $out
  rm $out/init $out/bin/switch-to-configuration
  bb=$(readlink -f ${base}/sw/bin/busybox)
  echo $(cat ${base}/nix-support/deps) ${grubEfi} > $out/nix-support/deps
  mkdir -p $out/etc
  cat > $out/etc/fstab <<'EOS'
  ${fstab}
  EOS

  cat > $out/init <<EOS
  #!$bb sh
  bb=$bb
  PATH=$out/sw/bin
  \$bb mount -o remount,rw none / || echo "init: cannot remount / read-write"
  \$bb mkdir -p /proc /sys /dev /tmp
  \$bb mount -t proc proc /proc
  \$bb mount -t sysfs sysfs /sys
  [ -e /dev/null ] || \$bb mount -t devtmpfs devtmpfs /dev
  df_kib() { \$bb df -k / | \$bb tail -n 1 | \$bb awk '{print \$2}'; }
  echo "@@fake-nixos boot $out df_kib=\$(df_kib)"
  ${runUnits}
  echo "@@fake-nixos done df_kib=\$(df_kib)"
  \$bb sync
  \$bb mount -o remount,ro none /
  \$bb poweroff -f
  EOS

  cat > $out/bin/switch-to-configuration <<'EOS'
  ${import ../../fixture/bootloader.nix {
    inherit (base.passthru) bb grub sdboot;
    inherit grubEfi efiSupport failure;
    grubDevice = if grubEnable then grub.device or "nodev" else "nodev";
    efiRemovable = grub.efiInstallAsRemovable or false;
    systemdBoot = config.boot.loader.systemd-boot.enable or false;
  }}
  EOS
  chmod +x $out/init $out/bin/switch-to-configuration
'' { }
