# The host side of nixvm-image: libvirt guests declared in NixOS, each with its
# own systemd unit, their disks made from the host's image store. This is the
# seed blog post's host module done properly:
#
#   - `services.nixvm.guests.<name> = { memory; diskSize; mac; ... }` gives a
#     unit nixvm-guest-<name>.service. Before it starts the domain, it makes
#     the guest's disk with `nixvm-image provision` (only when the disk does
#     not exist: an existing disk is never touched), then defines the domain
#     (reusing the UUID libvirt already has for the name: `virsh define`
#     matches domains by UUID, we by name) and starts it.
#   - The unit's main process waits on libvirt's lifecycle events and exits
#     when the domain stops, however it stops (shutdown inside the guest,
#     virsh, virt-manager), so systemd's view matches libvirt's (the seed's
#     fourth drawback). A clean stop leaves the unit inactive; a crash fails it.
#   - Stopping the unit asks the guest to shut down (ACPI), waits
#     shutdownTimeout seconds, then destroys the domain.
#   - A rebuild does not restart running guests (restartIfChanged = false, as
#     libvirtd.nix does for libvirtd and libvirt-guests): a changed guest
#     definition takes effect at the guest's next start by its unit (a reboot
#     inside the guest keeps the running definition). To apply it now:
#       systemctl restart nixvm-guest-NAME
#     which shuts the guest down gracefully, defines the new domain and
#     starts it. restartIfChanged = true per guest restores systemd's default.
#   - A guest removed from the configuration is stopped when its unit goes
#     away; its domain definition and its disk are kept (the seed's choice:
#     nothing deletes itself). `nixvm-orphans` lists such domains: defined in
#     libvirt, created by this module (they carry its metadata element), no
#     longer configured.
#   - firmware = "efi" boots the domain with UEFI (images built with
#     --layout efi; hybrid boots either way): libvirt picks the OVMF that
#     virtualisation.libvirtd provides (<os firmware="efi">, firmware
#     autoselection), without secure boot, and keeps the guest's NVRAM.
#   - The units start after libvirtd and libvirt-guests and so stop before
#     them at host shutdown: a unit shuts its guest down, so libvirt-guests'
#     onShutdown (suspend by default) never applies to these guests, and
#     onBoot finds them shut off and leaves them to their units.
#   - The host image store (/var/lib/nixvm-image/images, filled by
#     `nixvm-image push`) and a gc timer running `nixvm-image gc`, which never
#     removes the current generation or one that a guest disk uses.
#
# Pools named by guests must exist (e.g. `virsh pool-define-as guests logical
# --source-name vg0`, or virtualisation.libvirtd's own pool setup).
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.nixvm;
  inherit (lib) mkOption mkEnableOption mkIf types;

  nixvm = "${cfg.package}/bin/nixvm-image";
  metadataNS = "https://github.com/nixvm-image/nixvm-image/host";
  q = lib.escapeShellArg;
  # Guest names make unit, domain and volume names: a strict pattern.
  namePattern = "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}";

  xmlEscape = lib.replaceStrings [ "&" "<" ">" "\"" "'" ] [ "&amp;" "&lt;" "&gt;" "&quot;" "&apos;" ];

  guestModule = { name, ... }: {
    options = {
      name = mkOption {
        type = types.strMatching namePattern;
        default = name;
        defaultText = lib.literalExpression "<name>";
        description = "The domain's name (the attribute name by default): letters, digits, `.`, `_`, `-`, at most 63, as a unit and volume name allows.";
      };
      memory = mkOption {
        type = types.ints.positive;
        example = 4096;
        description = "Memory in MiB.";
      };
      vcpus = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Virtual CPUs.";
      };
      diskSize = mkOption {
        type = types.strMatching "[0-9]+(\\.[0-9]+)?[KMGT]?(i?B)?";
        example = "50G";
        description = "Size of the guest disk (binary units), made once; nixvm-resize grows the guest's root to it at first boot.";
      };
      mac = mkOption {
        type = types.strMatching "([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}";
        example = "D2:91:69:C0:14:9A";
        description = "MAC address of the guest's network interface.";
      };
      image = mkOption {
        type = types.strMatching "[A-Za-z0-9._-]+";
        default = "baseline";
        description = "Image name in the host store whose current generation the disk is made from.";
      };
      disk = {
        type = mkOption {
          type = types.enum [ "pool" "device" "file" "overlay" ];
          default = "pool";
          description = ''
            How the disk is made: "pool", a raw volume in a libvirt pool; "device", a
            full copy on a block device (an LVM volume /dev/VG/LV is created when
            missing); "file", a sparse raw file; "overlay", a qcow2 on the immutable
            image generation.
          '';
        };
        pool = mkOption {
          type = types.str;
          default = cfg.defaultPool;
          description = "The libvirt pool, for type pool.";
        };
        volume = mkOption {
          type = types.str;
          default = "guest-${name}";
          description = "The volume name, for type pool.";
        };
        path = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/dev/vg0/guest-${name}";
          description = "The block device (required for type device: an LVM volume /dev/VG/LV is created when missing) or the file (types file and overlay; default under /var/lib/libvirt/images).";
        };
      };
      network = {
        type = mkOption {
          type = types.enum [ "direct" "bridge" "network" ];
          default = "network";
          description = "libvirt interface type: direct (macvtap on a host NIC, as in the seed), bridge, or a libvirt network.";
        };
        source = mkOption {
          type = types.str;
          default = "default";
          example = "enp30s0";
          description = "The host NIC (direct), bridge (bridge) or libvirt network name (network).";
        };
      };
      firmware = mkOption {
        type = types.enum [ "bios" "efi" ];
        default = "bios";
        description = ''
          The firmware the domain boots with: "bios" (SeaBIOS) for images built with
          --layout legacy or legacy+gpt, "efi" (OVMF, chosen by libvirt's firmware
          autoselection from what virtualisation.libvirtd provides, secure boot off)
          for --layout efi; --layout hybrid boots with either.
        '';
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Restart the guest when a rebuild changes its unit. Off by default: a change
          takes effect at the guest's next start by its unit; apply it at once with
          `systemctl restart nixvm-guest-NAME`.
        '';
      };
      autostart = mkOption {
        type = types.bool;
        default = true;
        description = "Start the guest at boot (wantedBy multi-user.target).";
      };
      shutdownTimeout = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "Seconds a graceful shutdown may take before the domain is destroyed.";
      };
      extraDevices = mkOption {
        type = types.lines;
        default = "";
        description = "Extra libvirt XML inside <devices>.";
      };
    };
  };

  diskPath = name: g:
    if g.disk.path != null then g.disk.path
    else if g.disk.type == "overlay" then "/var/lib/libvirt/images/${name}.qcow2"
    else "/var/lib/libvirt/images/${name}.raw";

  provisionArgs = name: g:
    [ "provision" "--quiet" "--image" g.image "--guest" name "--size" g.diskSize ]
    ++ (if g.disk.type == "pool" then [ "--pool" g.disk.pool "--volume" g.disk.volume ]
        else if g.disk.type == "overlay" then [ "--overlay" (diskPath name g) ]
        else [ "--target" (diskPath name g) ]);

  diskXML = name: g:
    if g.disk.type == "pool" then ''
      <disk type="volume" device="disk">
        <driver name="qemu" type="raw" discard="unmap"/>
        <source pool="${xmlEscape g.disk.pool}" volume="${xmlEscape g.disk.volume}"/>
        <target dev="vda" bus="virtio"/>
      </disk>''
    else if g.disk.type == "device" then ''
      <disk type="block" device="disk">
        <driver name="qemu" type="raw" discard="unmap"/>
        <source dev="${xmlEscape (diskPath name g)}"/>
        <target dev="vda" bus="virtio"/>
      </disk>''
    else ''
      <disk type="file" device="disk">
        <driver name="qemu" type="${if g.disk.type == "overlay" then "qcow2" else "raw"}" discard="unmap"/>
        <source file="${xmlEscape (diskPath name g)}"/>
        <target dev="vda" bus="virtio"/>
      </disk>'';

  interfaceXML = g:
    if g.network.type == "direct" then ''
      <interface type="direct">
        <source dev="${xmlEscape g.network.source}" mode="bridge"/>
        <mac address="${g.mac}"/>
        <model type="virtio"/>
      </interface>''
    else ''
      <interface type="${g.network.type}">
        <source ${if g.network.type == "bridge" then "bridge" else "network"}="${xmlEscape g.network.source}"/>
        <mac address="${g.mac}"/>
        <model type="virtio"/>
      </interface>'';

  # @UUID@ is replaced at start time by the UUID libvirt has for the name.
  domainXML = name: g: pkgs.writeText "nixvm-guest-${name}.xml" ''
    <domain type="${cfg.domainType}">
      <name>${xmlEscape name}</name>
      <uuid>@UUID@</uuid>
      <metadata>
        <nixvm:guest xmlns:nixvm="${metadataNS}" image="${xmlEscape g.image}"/>
      </metadata>
      <memory unit="MiB">${toString g.memory}</memory>
      <vcpu>${toString g.vcpus}</vcpu>
      ${if g.firmware == "efi" then ''
      <os firmware="efi">
        <type arch="x86_64" machine="q35">hvm</type>
        <firmware>
          <feature enabled="no" name="secure-boot"/>
        </firmware>
        <boot dev="hd"/>
      </os>'' else ''
      <os>
        <type arch="x86_64" machine="q35">hvm</type>
        <boot dev="hd"/>
      </os>''}
      <features>
        <acpi/>
      </features>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        ${diskXML name g}
        ${interfaceXML g}
        <serial type="pty"/>
        <console type="pty"/>
        <graphics type="spice" autoport="yes" listen="127.0.0.1"/>
        <channel type="unix">
          <target type="virtio" name="org.qemu.guest_agent.0"/>
        </channel>
        ${g.extraDevices}
      </devices>
    </domain>
  '';

  # The guests' scripts: writeShellApplication runs them with errexit,
  # nounset and pipefail, with runtimeInputs on PATH, and shellchecks them.
  guestInputs = [ cfg.libvirtPackage config.virtualisation.libvirtd.qemu.package pkgs.coreutils pkgs.gnused pkgs.lvm2 ];

  # Provision the disk, define the domain (keeping its UUID), start it.
  startScript = name: g: pkgs.writeShellApplication {
    name = "nixvm-guest-${name}-start";
    runtimeInputs = guestInputs;
    text = ''
      ${nixvm} ${lib.escapeShellArgs (provisionArgs name g)}
      uuid=$(virsh domuuid ${q name} 2>/dev/null || true)
      xml=$(mktemp)
      trap 'rm -f "$xml"' EXIT
      if [ -n "$uuid" ]; then
        sed "s/@UUID@/$uuid/" ${domainXML name g} > "$xml"
      else
        sed '/@UUID@/d' ${domainXML name g} > "$xml"
      fi
      virsh define "$xml" >/dev/null
      state=$(virsh domstate ${q name})
      if [ "$state" != running ]; then
        virsh start ${q name}
      fi
    '';
  };

  # The unit's main process: exits when the domain is no longer running
  # (0 when it shut off, 1 when it crashed or vanished). It re-checks the
  # state after every lifecycle event and every 30 s, so a stop between two
  # `virsh event` calls is seen too.
  waitScript = name: pkgs.writeShellApplication {
    name = "nixvm-guest-${name}-wait";
    runtimeInputs = guestInputs;
    text = ''
      while :; do
        state=$(virsh domstate ${q name} 2>/dev/null || echo missing)
        case "$state" in
          running|paused|blocked|"in shutdown"|pmsuspended) ;;
          "shut off") echo "domain ${name} shut off"; exit 0 ;;
          *) echo "domain ${name} is $state"; exit 1 ;;
        esac
        virsh event --domain ${q name} --event lifecycle --timeout 30 >/dev/null 2>&1 || sleep 1
      done
    '';
  };

  # Graceful shutdown with a timeout, then destroy.
  stopScript = name: g: pkgs.writeShellApplication {
    name = "nixvm-guest-${name}-stop";
    runtimeInputs = guestInputs;
    text = ''
      running() {
        case "$(virsh domstate ${q name} 2>/dev/null || echo missing)" in
          "shut off"|missing|crashed) return 1 ;;
          *) return 0 ;;
        esac
      }
      running || exit 0
      virsh shutdown ${q name} >/dev/null 2>&1 || true
      deadline=$(( $(date +%s) + ${toString g.shutdownTimeout} ))
      while running; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
          echo "domain ${name} did not shut down in ${toString g.shutdownTimeout}s: destroying it"
          virsh destroy ${q name} || true
          break
        fi
        virsh event --domain ${q name} --event lifecycle --timeout 2 >/dev/null 2>&1 || sleep 1
      done
    '';
  };

  orphans = pkgs.writeShellApplication {
    name = "nixvm-orphans";
    runtimeInputs = [ cfg.libvirtPackage pkgs.gnugrep ];
    text = ''
      # Lists libvirt domains created by services.nixvm that are no longer
      # configured: their units are gone, the domains are stopped, their
      # definitions and disks are kept. Remove one by hand with
      #   virsh undefine --nvram NAME   (then delete its disk or volume)
      configured=${q (lib.concatStringsSep "\n" (lib.mapAttrsToList (_: g: g.name) cfg.guests))}
      virsh list --all --name | while read -r dom; do
        [ -n "$dom" ] || continue
        printf '%s\n' "$configured" | grep -qxF -- "$dom" && continue
        virsh dumpxml --inactive -- "$dom" 2>/dev/null | grep -qF '${metadataNS}' || continue
        printf '%s\t%s\n' "$dom" "$(virsh domstate -- "$dom" 2>/dev/null)"
      done
    '';
  };

  # What every unit of this module runs with. The guest units run virsh,
  # qemu-img and LVM on /dev and /var/lib/libvirt, so /usr and /etc stay
  # writable for them; gc adds ProtectSystem = "strict".
  hardening = {
    NoNewPrivileges = true;
    PrivateTmp = true;
    ProtectHome = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectControlGroups = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
  };

  gcArgs =
    [ "gc" "--keep" (toString cfg.gc.keep) "--domains" ]
    ++ lib.concatMap (d: [ "--scan" d ]) cfg.gc.scanDirs
    ++ lib.concatMap (p: [ "--pool" p ]) (lib.unique (cfg.gc.pools
      ++ lib.mapAttrsToList (_: g: g.disk.pool) (lib.filterAttrs (_: g: g.disk.type == "pool") cfg.guests)));
in
{
  imports = [ ./pull.nix ]; # services.nixvm.images: pull timers

  options.services.nixvm = {
    enable = mkEnableOption "libvirt guests made from nixvm-image base images";
    package = mkOption {
      type = types.package;
      default = pkgs.nixvm-image or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.nixvm-image (overlays.default), else pkgs.callPackage ./package.nix { }";
      description = "The nixvm-image package.";
    };
    libvirtPackage = mkOption {
      type = types.package;
      default = config.virtualisation.libvirtd.package;
      defaultText = lib.literalExpression "config.virtualisation.libvirtd.package";
      description = "The libvirt providing virsh.";
    };
    domainType = mkOption {
      type = types.enum [ "kvm" "qemu" ];
      default = "kvm";
      description = "libvirt domain type: kvm, or qemu (TCG) on hosts without KVM.";
    };
    defaultPool = mkOption {
      type = types.str;
      default = "guests";
      description = "The libvirt pool for guests whose disk.type is pool.";
    };
    guests = mkOption {
      type = types.attrsOf (types.submodule guestModule);
      default = { };
      description = "The guests: one systemd unit nixvm-guest-NAME.service each.";
    };
    gc = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Remove old image generations periodically (nixvm-image gc).";
      };
      keep = mkOption {
        type = types.ints.unsigned;
        default = 2;
        description = "Generations kept per image, the current one included; generations that guest disks use are always kept.";
      };
      dates = mkOption {
        type = types.str;
        default = "weekly";
        description = "When gc runs (systemd OnCalendar).";
      };
      scanDirs = mkOption {
        type = types.listOf types.str;
        default = [ "/var/lib/libvirt/images" "/etc/virt/base-images" ];
        description = "Directories searched for disks and links that use generations.";
      };
      pools = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Extra libvirt pools searched (the guests' pools always are).";
      };
    };
  };

  config = mkIf cfg.enable {
    virtualisation.libvirtd.enable = true;
    environment.systemPackages = [ cfg.package orphans ];

    systemd.tmpfiles.rules = [
      "d /var/lib/nixvm-image 0755 root root -"
      "d /var/lib/nixvm-image/images 0755 root root -"
      "d /var/lib/libvirt/images 0711 root root -"
    ];

    assertions = lib.mapAttrsToList (attr: g: {
      assertion = g.disk.type != "device" || g.disk.path != null;
      message = "services.nixvm.guests.${attr}: disk.type = \"device\" needs disk.path, the block device (e.g. /dev/vg0/guest-${attr}).";
    }) cfg.guests;

    systemd.services = lib.mapAttrs' (_: g: let name = g.name; in lib.nameValuePair "nixvm-guest-${name}" {
      description = "libvirt guest ${name} (nixvm-image)";
      after = [ "libvirtd.service" "libvirt-guests.service" "network.target" ];
      requires = [ "libvirtd.service" ];
      wantedBy = lib.optional g.autostart "multi-user.target";
      # A rebuild leaves a running guest alone (see the top of this file).
      inherit (g) restartIfChanged;
      serviceConfig = hardening // {
        Type = "simple";
        ExecStartPre = utils.escapeSystemdExecArgs [ (lib.getExe (startScript name g)) ];
        ExecStart = utils.escapeSystemdExecArgs [ (lib.getExe (waitScript name)) ];
        ExecStop = utils.escapeSystemdExecArgs [ (lib.getExe (stopScript name g)) ];
        TimeoutStartSec = "infinity"; # a first full copy of a large disk takes a while
        TimeoutStopSec = g.shutdownTimeout + 30;
        KillMode = "mixed";
        Restart = "no";
      };
    }) cfg.guests // lib.optionalAttrs cfg.gc.enable {
      nixvm-image-gc = {
        description = "Remove unused nixvm-image generations";
        after = [ "libvirtd.service" ];
        wants = [ "libvirtd.service" ];
        path = [ cfg.libvirtPackage ];
        serviceConfig = hardening // {
          Type = "oneshot";
          ExecStart = utils.escapeSystemdExecArgs ([ nixvm ] ++ gcArgs);
          # gc writes only the image store (the scanned directories and
          # pools it only reads); it reaches libvirt over its socket.
          ProtectSystem = "strict";
          ReadWritePaths = [ "/var/lib/nixvm-image" ];
          PrivateNetwork = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
          # It reads the headers of qcow2 disks, LVs included, and nothing
          # else in /dev: no character device (a watchdog reboots the host
          # when opened), no block device written. PrivateDevices would
          # hide the LVs that domains use.
          DevicePolicy = "closed";
          DeviceAllow = [ "block-* r" ];
          # Root only to read guests' disks (owned by the qemu user) and
          # to remove what it owns in the store.
          CapabilityBoundingSet = [ "CAP_DAC_READ_SEARCH" ];
          AmbientCapabilities = [ ];
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelLogs = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictNamespaces = true;
          RestrictRealtime = true;
          MemoryDenyWriteExecute = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
          SystemCallErrorNumber = "EPERM"; # a call outside the set fails, not kills
          UMask = "0077";
        };
      };
    };

    systemd.timers = lib.optionalAttrs cfg.gc.enable {
      nixvm-image-gc = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.gc.dates;
          Persistent = true;
          RandomizedDelaySec = "1h";
        };
      };
    };
  };
}
