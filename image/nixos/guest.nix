# The NixOS builder guest that the vfkit backend boots on macOS (aarch64-linux).
#
# What the host hands it (workers/backends/vfkit/backend.py):
#   kernel + initrd + cmdline    direct kernel boot, no bootloader, no EFI
#   /dev/vda                     the persistent data disk, blank on first boot
#   /dev/vdb                     this system's store image (squashfs, read-only)
#   virtiofs "virby-keys"        host key, authorized_keys, user name, shares list, rosetta flag
#   virtiofs <tag>               each shared directory; "rosetta" when enabled
#   hvc1                         the guest agent's port (vfkit's virtio-serial,pty): the same
#                                agent as the Debian guest's (../guest/common/usr/sbin/virby-agent)
#                                announces "virby-ready <ip>", takes the host's clock after a
#                                resume and powers off on the host's word
#
# Shares, Rosetta and debug are read at boot, not built in: changing those options never
# needs a new image (and so never a Linux builder on the Mac). Only extraConfig does.
#
# Not built or booted here (no aarch64-linux builder, no macOS): the unit wiring follows
# nixpkgs' netboot/ISO store overlay and the systemd initrd; check the first boot's console.log.
{ config, lib, pkgs, modulesPath, ... }:

let
  builder = "builder";
  nix = config.nix.package;

  # The system's closure as one read-only image, with nix-path-registration at its root
  # (nixpkgs' netboot does the same).
  storeImage = pkgs.callPackage "${modulesPath}/../lib/make-squashfs.nix" {
    storeContents = [ config.system.build.toplevel ];
    comp = "zstd -Xcompression-level 6";
  };

  installKeys = pkgs.writeShellScript "virby-install-keys" ''
    set -euo pipefail
    src=$(mktemp -d /run/virby-share.XXXXXX)
    # virtiofs shows every file as owned by one user with the host's modes: copy what we need
    # with our own owners and modes, then unmount so no other guest user can read the share.
    mount -t virtiofs -o ro,nodev,noexec,nosuid virby-keys "$src"
    trap 'umount "$src"; rmdir "$src"' EXIT
    user=$(head -n1 "$src/user" 2>/dev/null || echo ${builder})
    if ! id "$user" >/dev/null 2>&1; then
      echo "virby: the host asks for user '$user', which this guest lacks; using ${builder}" >&2
      user=${builder}
    fi
    install -D -m 0600 -o root -g root "$src/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
    install -D -m 0644 -o root -g root "$src/authorized_keys" "/etc/ssh/authorized_keys.d/$user"
    mkdir -p /run/virby
    install -m 0644 "$src/shares" /run/virby/shares 2>/dev/null || : > /run/virby/shares
    rm -f /run/virby/rosetta
    if [ -e "$src/rosetta" ]; then touch /run/virby/rosetta; fi
  '';

  mountShares = pkgs.writeShellScript "virby-mount-shares" ''
    set -uo pipefail
    status=0
    while read -r tag; do
      [ -n "$tag" ] || continue
      mkdir -p "/mnt/virtiofs/$tag"
      mountpoint -q "/mnt/virtiofs/$tag" \
        || mount -t virtiofs -o nodev,nosuid "$tag" "/mnt/virtiofs/$tag" || status=1
    done < /run/virby/shares
    if [ -e /run/virby/rosetta ]; then
      mkdir -p /run/rosetta
      mountpoint -q /run/rosetta || mount -t virtiofs -o ro rosetta /run/rosetta || status=1
      if [ ! -e /proc/sys/fs/binfmt_misc/rosetta ]; then
        # x86_64 ELF -> Rosetta. F: the kernel opens the interpreter now, so it works inside
        # the Nix sandbox; C: set-id binaries keep their credentials.
        printf '%s' ':rosetta:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00:\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/run/rosetta/rosetta:CF' \
          > /proc/sys/fs/binfmt_misc/register || status=1
      fi
    fi
    exit $status
  '';
in
{
  nixpkgs.hostPlatform = lib.mkDefault "aarch64-linux";
  system.stateVersion = "25.05";

  # -- boot ------------------------------------------------------------------------------------
  boot.loader.grub.enable = false; # vfkit loads kernel and initrd itself
  boot.initrd.systemd.enable = true;
  boot.initrd.availableKernelModules = [
    "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_net" "virtio_console" "virtiofs"
    "squashfs" "overlay" "ext4"
  ];
  # hvc0 is vfkit's virtio-serial device, logged to <stateDir>/logs/console.log on the host.
  boot.kernelParams = [ "console=hvc0" "panic=5" ];
  # The arm64 kernel image (kernelFile "Image") is uncompressed, as vfkit requires.

  # The data disk: formatted once, on the first boot, before the root is mounted. Never
  # reformatted: blkid finding any filesystem leaves it alone.
  boot.initrd.systemd.extraBin = {
    "mkfs.ext4" = "${pkgs.e2fsprogs}/bin/mkfs.ext4";
    blkid = "${pkgs.util-linux}/bin/blkid";
  };
  boot.initrd.systemd.services.virby-data-disk = {
    description = "Format Virby's data disk on first boot";
    unitConfig.DefaultDependencies = false;
    requires = [ "dev-vda.device" ];
    after = [ "dev-vda.device" ];
    before = [ "sysroot.mount" ];
    requiredBy = [ "sysroot.mount" ];
    serviceConfig.Type = "oneshot";
    script = ''
      if ! blkid -p /dev/vda >/dev/null 2>&1; then
        mkfs.ext4 -q -L virby-data /dev/vda
      fi
      # The store overlay's upper and work dirs live on it; make sure they exist.
      mkdir -p /run/virby-data
      mount -t ext4 /dev/vda /run/virby-data
      mkdir -p /run/virby-data/nix/.rw-store/store /run/virby-data/nix/.rw-store/work
      umount /run/virby-data
    '';
  };

  # The whole root is the data disk: /nix/var (the store database, GC roots), the store's
  # writable layer, /home and logs survive reboots and guest updates. autoResize grows the
  # filesystem when the host grew the disk (diskSize went up).
  fileSystems."/" = {
    device = "/dev/vda";
    fsType = "ext4";
    autoResize = true;
    options = [ "noatime" "discard" ];
  };
  fileSystems."/nix/.ro-store" = {
    device = "/dev/vdb";
    fsType = "squashfs";
    options = [ "ro" ];
    neededForBoot = true;
  };
  fileSystems."/nix/store" = {
    overlay = {
      lowerdir = [ "/nix/.ro-store" ];
      upperdir = "/nix/.rw-store/store";
      workdir = "/nix/.rw-store/work";
    };
    neededForBoot = true;
  };

  # Register this image's paths in the store database, before nix-daemon uses it. When the
  # image changed, first drop registrations of paths that vanished with the old image
  # (`--verify` removes entries whose files are gone); nothing was copied up for those.
  systemd.services.virby-register-store = {
    description = "Register the guest image's store paths";
    wantedBy = [ "multi-user.target" ];
    before = [ "nix-daemon.service" "nix-daemon.socket" ];
    after = [ "local-fs.target" ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    script = ''
      marker=/nix/var/nix/virby-image
      current=${config.system.build.toplevel}
      if [ "$(cat "$marker" 2>/dev/null)" != "$current" ]; then
        if [ -e "$marker" ]; then ${nix}/bin/nix-store --verify; fi
        ${nix}/bin/nix-store --load-db < /nix/.ro-store/nix-path-registration
        ${nix}/bin/nix-env -p /nix/var/nix/profiles/system --set "$current"
        echo "$current" > "$marker"
      fi
    '';
  };

  # -- network ---------------------------------------------------------------------------------
  networking.hostName = "virby-vm";
  networking.useDHCP = true;
  # Send the MAC as the DHCP client id. Otherwise macOS 15's bootpd files the lease under a
  # DUID with no MAC in it, and the host's lease-file fallback cannot find us (vfkit#242).
  networking.dhcpcd.extraConfig = ''
    clientid ""
  '';

  # -- ssh -------------------------------------------------------------------------------------
  users.mutableUsers = false;
  users.allowNoPasswordLogin = true;
  users.users.${builder} = {
    isNormalUser = true;
    description = "Nix remote builds from the Mac";
  };

  services.openssh = {
    enable = true;
    hostKeys = [ ]; # never generate one: the host's pinned key is installed below
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "no";
    };
    extraConfig = ''
      HostKey /etc/ssh/ssh_host_ed25519_key
    '';
  };

  systemd.services.virby-install-keys = {
    description = "Install the SSH keys and settings the host hands over";
    before = [ "sshd.service" ];
    requiredBy = [ "sshd.service" ];
    wantedBy = [ "multi-user.target" ];
    path = [ pkgs.util-linux pkgs.coreutils ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; ExecStart = installKeys; };
  };

  systemd.services.virby-shares = {
    description = "Mount the host's shared directories and register Rosetta";
    after = [ "virby-install-keys.service" ];
    requires = [ "virby-install-keys.service" ];
    before = [ "nix-daemon.service" "virby-agent.service" ];
    wantedBy = [ "multi-user.target" ];
    path = [ pkgs.util-linux pkgs.coreutils ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; ExecStart = mountShares; };
  };

  # The one guest agent (line protocol in its header), on the first virtio console that is not
  # the kernel's: hvc1 here. It announces sshd with its address once sshd listens, so no unit
  # ordering is needed; busybox gives it the tools it was written with.
  systemd.services.virby-agent = {
    description = "Virby's guest agent on hvc1: readiness, clock, power-off";
    after = [ "virby-shares.service" ];
    wantedBy = [ "multi-user.target" ];
    path = [ pkgs.busybox ];
    environment.VIRBY_POWEROFF = "${pkgs.systemd}/bin/systemctl poweroff";
    serviceConfig = {
      ExecStart = "${pkgs.busybox}/bin/sh ${../guest/common/usr/sbin/virby-agent}";
      Restart = "always";
    };
  };

  # -- time ------------------------------------------------------------------------------------
  # A paused VM's clock stands still. The host sets it right after each resume through the
  # agent; chrony steps it after a host sleep (no pause) or any other jump larger than a
  # second, at its next poll.
  services.chrony = {
    enable = true;
    extraConfig = ''
      makestep 1 -1
    '';
  };

  # -- nix -------------------------------------------------------------------------------------
  nix.settings = {
    trusted-users = [ builder ];
    experimental-features = [ "nix-command" "flakes" ];
    auto-optimise-store = true;
    # Garbage-collect during builds when the disk runs low.
    min-free = 5 * 1024 * 1024 * 1024;
    max-free = 7 * 1024 * 1024 * 1024;
    # x86_64 builds come only when the host enabled Rosetta (buildMachines.systems).
    extra-platforms = [ "x86_64-linux" ];
    extra-sandbox-paths = [ "/run/rosetta?" ];
  };
  nix.channel.enable = false;

  # -- trimmed ---------------------------------------------------------------------------------
  documentation.enable = false;
  programs.command-not-found.enable = false;
  boot.enableContainers = false;
  xdg.mime.enable = false;

  # What image/nixos/default.nix and the nix-darwin module read.
  system.build.virby = {
    kernel = "${config.system.build.kernel}/${config.system.boot.loader.kernelFile}";
    initrd = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";
    cmdline = "init=${config.system.build.toplevel}/init ${toString config.boot.kernelParams}";
    disk = "${storeImage}";
  };
}
