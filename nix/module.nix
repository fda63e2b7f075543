# nix-darwin module: services.virby.*
#
# Writes /etc/virby/config.json (read by `virby run`), the launchd daemon that runs it, the
# ssh_config alias `virby-vm`, and the Nix build machine that points at it. Everything computed
# from the options lives in ./lib.nix (builtins only, tested without nixpkgs); this file wires.
#
# The build machine goes where the Nix in charge reads it, found without a setting:
#   - Determinate's nix-darwin module (determinateNix.enable): determinateNix.buildMachines;
#   - nix-darwin managing Nix (nix.enable, the default): nix.buildMachines;
#   - neither (nix.enable = false, e.g. Determinate Nix without its module): nix-darwin writes
#     no /etc/nix/machines then, so this module writes it (Nix's default `builders` reads it).
{ config, lib, options, pkgs, ... }:

let
  inherit (lib) literalExpression mkEnableOption mkIf mkMerge mkOption optionalAttrs types;

  cfg = config.services.virby;
  virbyLib = import ./lib.nix;
  defaults = (virbyLib { }).defaults;
  configPath = "/etc/virby/config.json";
  user = "_virby";
  group = "virby";
  id = 348; # Virby's uid/gid, kept so an install migrating from it finds its own account

  # The default guest is the lock's aarch64 Debian guest, assembled on the Mac by Python from
  # fixed-output downloads (./guest.nix): no Linux builder is needed for the first switch.
  debianGuest = pkgs.callPackage ./guest.nix {
    virby = cfg.package;
    lockFile = cfg.guestLock;
    securityMirror = cfg.debianSecurityMirror;
    snapshotBase = cfg.debianSnapshot;
  };
  # The NixOS guest (opt-in): an aarch64-linux build, so it needs a Linux builder, which the
  # Debian guest is once the first switch is done. Only extraConfig changes it.
  nixosGuest = import ../image/nixos {
    nixpkgs = pkgs.path;
    extraModules = [ cfg.extraConfig ];
  };
  guest =
    if cfg.nixosGuest.enable then nixosGuest
    else {
      kernel = "${debianGuest}/vmlinuz";
      initrd = "${debianGuest}/initrd.img";
      inherit (debianGuest) cmdline;
      disk = null; # the store is on the data disk (/dev/vda), mounted at /nix by the guest
      bundle = debianGuest;
    };

  virby = virbyLib {
    inherit (cfg)
      backend port cores memory diskSize rosetta nestedVirtualization sharedDirectories debug
      speedFactor allowUserSsh substituters trustedPublicKeys;
    onDemand = { inherit (cfg.onDemand) enable ttl pauseAfter stopAfter; };
    guest = { inherit (guest) kernel initrd cmdline disk; };
    hypervisor =
      if cfg.backend == "vfkit" then lib.getExe pkgs.vfkit
      else "${pkgs.qemu}/bin/qemu-system-aarch64";
    virbyExe = lib.getExe cfg.package;
    inherit configPath user;
  };
  inherit (virby) stateDir runtimeDir;

  # Which Nix configuration registers the builder (see the top of this file).
  determinateDetected = options ? determinateNix && config.determinateNix.enable;
  nixManaged = config.nix.enable or true; # nix-darwin before nix.enable always managed Nix
in
{
  options.services.virby = {
    enable = mkEnableOption "Virby, a Linux builder VM that runs only while Nix needs it";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage <virby/nix/package.nix> { }";
      description = "The Virby package (its `virby` command runs the supervisor).";
    };

    backend = mkOption {
      type = types.enum [ "vfkit" "qemu" ];
      default = defaults.backend;
      description = ''
        Hypervisor front end. "vfkit" (Virtualization.framework) is the one the guest is made
        for; "qemu" (HVF) is experimental on macOS.
      '';
    };

    cores = mkOption {
      type = types.ints.positive;
      default = defaults.cores;
      description = "Virtual CPUs; also the builder's maxJobs.";
    };

    memory = mkOption {
      type = types.either types.ints.positive types.str;
      default = defaults.memory;
      example = "8GiB";
      description = ''Guest memory: MiB as a number, or a string with M, MiB, G or GiB. At least 1024 MiB.'';
    };

    diskSize = mkOption {
      type = types.either types.ints.positive types.str;
      default = defaults.diskSize;
      example = "200GiB";
      description = ''
        Size of the persistent data disk (bytes, or "100GiB", "512G", "2T"; powers of 1024).
        Growing it grows the disk in place at the next VM start; it is never shrunk.
      '';
    };

    port = mkOption {
      type = types.port;
      default = defaults.port;
      description = "Loopback TCP port on which the VM's SSH is reachable (1024 to 65535).";
    };

    onDemand = {
      enable = mkOption {
        type = types.bool;
        default = defaults.onDemand.enable;
        description = ''
          Start the VM on the first SSH connection, pause it when idle and stop it later, so
          its memory goes back to macOS. The cost is the next start: vfkit cannot save a VM yet
          (vfkit#449), so after a stop the next build waits for a cold boot; QEMU restores
          from a snapshot. Off: the VM boots with the daemon and is restarted if it dies.
        '';
      };
      ttl = mkOption {
        type = types.ints.positive;
        default = defaults.onDemand.ttl;
        description = "Minutes without a connection before the VM stops (Virby's option); the default for stopAfter.";
      };
      pauseAfter = mkOption {
        type = types.nullOr types.ints.positive;
        default = defaults.onDemand.pauseAfter;
        description = "Seconds without a connection before the VM's CPUs are paused; null never pauses.";
      };
      stopAfter = mkOption {
        type = types.nullOr types.ints.positive;
        default = cfg.onDemand.ttl * 60;
        defaultText = literalExpression "config.services.virby.onDemand.ttl * 60";
        description = "Seconds without a connection before the VM powers off (memory returned); null never stops.";
      };
    };

    substituters = mkOption {
      type = types.listOf types.str;
      default = defaults.substituters;
      example = [ "https://cache.nixos.org" "https://nix-community.cachix.org" ];
      description = ''
        Binary caches the guest's Nix substitutes from itself (written into its nix.conf at
        every boot). With builders-use-substitutes, which this module sets, a build's Linux
        inputs come from these straight into the builder instead of through the Mac's store.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = defaults.trustedPublicKeys;
      description = "Keys the guest's Nix accepts signatures from (NAME:BASE64), for substituters.";
    };

    rosetta = mkOption {
      type = types.bool;
      default = defaults.rosetta;
      description = "Run x86_64-linux builds through Rosetta (adds x86_64-linux to the builder's systems).";
    };

    nestedVirtualization = mkOption {
      type = types.bool;
      default = defaults.nestedVirtualization;
      description = ''
        Give the guest /dev/kvm and advertise the kvm and nixos-test features. Needs an Apple
        M3 or later and macOS 15: evaluation cannot see the hardware, so activation warns on a
        Mac that lacks either (Nix would then send VM tests to a builder that fails them).
      '';
    };

    sharedDirectories = mkOption {
      type = types.attrsOf types.str;
      default = defaults.sharedDirectories;
      example = { src = "/Users/me/src"; };
      description = "Host directories shared into the guest: tag = absolute path; mounted at /mnt/virtiofs/<tag>.";
    };

    guestLock = mkOption {
      type = types.path;
      default = ../image/guest.lock.json;
      defaultText = literalExpression "<virby/image/guest.lock.json>";
      description = ''
        The lock file (`virby guest lock`) naming the Debian packages of the default guest, with
        their sha256. The guest is its aarch64 `nix` variant, built on this Mac.
      '';
    };

    debianSecurityMirror = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "http://<a Debian security mirror>/debian-security";
      description = ''
        Optional: a Debian security archive mirror, tried first for the lock's packages from
        that archive (mirror://debian-security/, often the kernel). Without it they come from
        the main archive's pool (once a point release has them) and from Debian's snapshot
        service, both known to nixpkgs.
      '';
    };

    debianSnapshot = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "http://<a snapshot service>";
      description = ''
        Base URL of Debian's snapshot service (serving archive/<archive>/<timestamp>/...), the
        fallback for every guest package (the pool drops superseded versions). null: the base
        nixpkgs' vmTools.debDistros use.
      '';
    };

    nixosGuest.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Boot the NixOS guest (image/nixos) instead of the default Debian guest. It is an
        aarch64-linux build: switch once with the default guest (which then is your Linux
        builder), then enable this.
      '';
    };

    extraConfig = mkOption {
      type = types.deferredModule;
      default = { };
      description = "A NixOS module merged into the NixOS guest (nixosGuest.enable). Changing it rebuilds that guest on the Linux builder.";
    };

    debug = mkOption {
      type = types.bool;
      default = defaults.debug;
      description = "Verbose logs from Virby and vfkit. Does not change the guest image.";
    };

    speedFactor = mkOption {
      type = types.ints.positive;
      default = defaults.speedFactor;
      description = "The build machine's speedFactor.";
    };

    allowUserSsh = mkOption {
      type = types.bool;
      default = defaults.allowUserSsh;
      description = ''
        Let members of the `virby` group run `ssh virby-vm`: a copy of the client key readable by
        that group (mode 0640), never by everyone. Add users with users.groups.virby.members.
      '';
    };

    supportDeterminateNix = mkOption {
      type = types.bool;
      default = determinateDetected;
      defaultText = literalExpression "options ? determinateNix && config.determinateNix.enable";
      description = ''
        Register the builder in determinateNix.buildMachines (Determinate's nix-darwin module)
        instead of nix.buildMachines. Detected: true when that module is imported and enabled.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions =
        map (message: { assertion = false; inherit message; }) virby.errors
        ++ [
          {
            assertion = pkgs.stdenv.hostPlatform.isDarwin && pkgs.stdenv.hostPlatform.isAarch64;
            message = "services.virby needs an Apple silicon Mac (aarch64-darwin).";
          }
          {
            assertion = !cfg.supportDeterminateNix
              || (options ? determinateNix && config.determinateNix.enable);
            message = "services.virby.supportDeterminateNix needs determinateNix.enable (the Determinate nix-darwin module).";
          }
        ];

      warnings = lib.optional (!cfg.nixosGuest.enable && debianGuest.snapshotBase == null)
        "services.virby: nixpkgs' vmTools.debDistros give no Debian snapshot base here, so the guest's packages have no fallback once Debian's pool drops their versions: set services.virby.debianSnapshot.";

      users.groups.${group} = { gid = id; description = "Virby"; };
      users.users.${user} = {
        uid = id;
        gid = id;
        home = stateDir;
        createHome = false;
        shell = "/usr/bin/false";
        isHidden = true;
        description = "Virby";
      };
      users.knownGroups = [ group ];
      users.knownUsers = [ user ];

      environment.etc."virby/config.json".text = builtins.toJSON virby.config;
      environment.etc."ssh/ssh_config.d/100-virby-vm.conf".text = virby.sshConfig;
      environment.systemPackages = [ cfg.package ];

      launchd.daemons.virby.serviceConfig = virby.launchdJob;

      # launchd opens the log files and enters WorkingDirectory but creates neither: make them
      # in the launchd phase, just before nix-darwin loads the daemon (the users and groups
      # phases ran earlier; postActivation runs only after the daemon's first start, which then
      # failed on a fresh Mac). Found by evaluating this module in nix-darwin.
      system.activationScripts.launchd.text = lib.mkBefore ''
        echo "setting up Virby in ${stateDir}..." >&2
        install -d -m 0750 -o ${user} -g ${group} ${stateDir} ${stateDir}/logs
        install -d -m 0700 -o ${user} -g ${group} ${runtimeDir}
      '';

      # The keys are made by `virby run` itself (one owner for them) at the daemon's first
      # start, so the group copy for allowUserSsh can only follow at an activation after that.
      system.activationScripts.postActivation.text = lib.mkAfter ((if cfg.allowUserSsh then ''
        if [ -e ${virby.clientKey} ]; then
          install -m 0640 -o ${user} -g ${group} ${virby.clientKey} ${virby.sharedKey}
        else
          echo "virby: no client key yet; the copy for the virby group is made at the next activation after the daemon's first start" >&2
        fi
      '' else ''
        rm -f ${virby.sharedKey}
      '') + lib.optionalString cfg.nestedVirtualization (virby.nestedCheck { }));

      system.build.virbyGuest = guest.bundle;
    }
    # Determinate's module writes /etc/nix/machines from determinateNix.buildMachines and
    # customSettings into /etc/nix/nix.custom.conf.
    (optionalAttrs (options ? determinateNix) {
      determinateNix = mkIf cfg.supportDeterminateNix {
        buildMachines = [ virby.buildMachine ];
        distributedBuilds = true;
        customSettings.builders-use-substitutes = lib.mkDefault true;
      };
    })
    (mkIf (!cfg.supportDeterminateNix && nixManaged) {
      nix.buildMachines = [ virby.buildMachine ];
      nix.distributedBuilds = true;
      # The guest fetches its inputs from the binary cache itself instead of through the Mac.
      nix.settings.builders-use-substitutes = lib.mkDefault true;
    })
    (mkIf (!cfg.supportDeterminateNix && !nixManaged) {
      environment.etc."nix/machines".text = virby.machinesText;
    })
  ]);
}
