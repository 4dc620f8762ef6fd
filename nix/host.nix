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
#   - A guest removed from the configuration is stopped when its unit goes
#     away; its domain definition and its disk are kept (the seed's choice:
#     nothing deletes itself). `nixvm-orphans` lists such domains: defined in
#     libvirt, created by this module (they carry its metadata element), no
#     longer configured.
#   - The host image store (/var/lib/nixvm-image/images, filled by
#     `nixvm-image push`) and a gc timer running `nixvm-image gc`, which never
#     removes the current generation or one that a guest disk uses.
#
# Pools named by guests must exist (e.g. `virsh pool-define-as guests logical
# --source-name vg0`, or virtualisation.libvirtd's own pool setup).
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixvm;
  inherit (lib) mkOption mkEnableOption mkIf types;

  virsh = "${cfg.libvirtPackage}/bin/virsh";
  nixvm = "${cfg.package}/bin/nixvm-image";
  metadataNS = "https://github.com/nixvm-image/nixvm-image/host";
  q = lib.escapeShellArg;

  xmlEscape = lib.replaceStrings [ "&" "<" ">" "\"" "'" ] [ "&amp;" "&lt;" "&gt;" "&quot;" "&apos;" ];

  guestModule = { name, ... }: {
    options = {
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
          description = "The device or file, for the other types (default: under /var/lib/libvirt/images).";
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
      <os>
        <type arch="x86_64" machine="q35">hvm</type>
        <boot dev="hd"/>
      </os>
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

  # Provision the disk, define the domain (keeping its UUID), start it.
  startScript = name: g: pkgs.writeShellScript "nixvm-guest-${name}-start" ''
    set -euo pipefail
    ${nixvm} ${lib.escapeShellArgs (provisionArgs name g)}
    uuid=$(${virsh} domuuid ${q name} 2>/dev/null || true)
    xml=$(mktemp)
    trap 'rm -f "$xml"' EXIT
    if [ -n "$uuid" ]; then
      sed "s/@UUID@/$uuid/" ${domainXML name g} > "$xml"
    else
      sed '/@UUID@/d' ${domainXML name g} > "$xml"
    fi
    ${virsh} define "$xml" >/dev/null
    state=$(${virsh} domstate ${q name})
    if [ "$state" != running ]; then
      ${virsh} start ${q name}
    fi
  '';

  # The unit's main process: exits when the domain is no longer running
  # (0 when it shut off, 1 when it crashed or vanished). It re-checks the
  # state after every lifecycle event and every 30 s, so a stop between two
  # `virsh event` calls is seen too.
  waitScript = name: pkgs.writeShellScript "nixvm-guest-${name}-wait" ''
    set -u
    while :; do
      state=$(${virsh} domstate ${q name} 2>/dev/null || echo missing)
      case "$state" in
        running|paused|blocked|"in shutdown"|pmsuspended) ;;
        "shut off") echo "domain ${name} shut off"; exit 0 ;;
        *) echo "domain ${name} is $state"; exit 1 ;;
      esac
      ${virsh} event --domain ${q name} --event lifecycle --timeout 30 >/dev/null 2>&1 || sleep 1
    done
  '';

  # Graceful shutdown with a timeout, then destroy.
  stopScript = name: g: pkgs.writeShellScript "nixvm-guest-${name}-stop" ''
    set -u
    running() {
      case "$(${virsh} domstate ${q name} 2>/dev/null || echo missing)" in
        "shut off"|missing|crashed) return 1 ;;
        *) return 0 ;;
      esac
    }
    running || exit 0
    ${virsh} shutdown ${q name} >/dev/null 2>&1 || true
    deadline=$(( $(date +%s) + ${toString g.shutdownTimeout} ))
    while running; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "domain ${name} did not shut down in ${toString g.shutdownTimeout}s: destroying it"
        ${virsh} destroy ${q name} || true
        break
      fi
      ${virsh} event --domain ${q name} --event lifecycle --timeout 2 >/dev/null 2>&1 || sleep 1
    done
  '';

  orphans = pkgs.writeShellScriptBin "nixvm-orphans" ''
    # Lists libvirt domains created by services.nixvm that are no longer
    # configured: their units are gone, the domains are stopped, their
    # definitions and disks are kept. Remove one by hand with
    #   virsh undefine NAME   (then delete its disk or volume)
    set -eu
    configured=${q (lib.concatStringsSep "\n" (lib.attrNames cfg.guests))}
    ${virsh} list --all --name | while read -r dom; do
      [ -n "$dom" ] || continue
      printf '%s\n' "$configured" | grep -qxF -- "$dom" && continue
      ${virsh} dumpxml --inactive -- "$dom" 2>/dev/null | grep -qF '${metadataNS}' || continue
      printf '%s\t%s\n' "$dom" "$(${virsh} domstate -- "$dom" 2>/dev/null)"
    done
  '';

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
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
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

    systemd.services = lib.mapAttrs' (name: g: lib.nameValuePair "nixvm-guest-${name}" {
      description = "libvirt guest ${name} (nixvm-image)";
      after = [ "libvirtd.service" "network.target" ];
      requires = [ "libvirtd.service" ];
      wantedBy = lib.optional g.autostart "multi-user.target";
      path = [ cfg.libvirtPackage config.virtualisation.libvirtd.qemu.package pkgs.coreutils pkgs.gnused pkgs.lvm2 ];
      serviceConfig = {
        Type = "simple";
        ExecStartPre = "${startScript name g}";
        ExecStart = "${waitScript name}";
        ExecStop = "${stopScript name g}";
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
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${nixvm} ${lib.escapeShellArgs gcArgs}";
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
