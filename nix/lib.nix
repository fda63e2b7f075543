# Virby's pure Nix helpers: builtins only (no nixpkgs), so tests evaluate them with a plain
# `nix-instantiate --eval --strict --json`, and the nix-darwin module (module.nix) only wires
# their results into options.
#
#   let virby = import ./lib.nix { cores = 4; memory = "8GiB"; ... }; in
#   virby.errors        # [ "services.virby.memory: ..." ] -> the module's assertions
#   virby.config        # the JSON document for /etc/virby/config.json (core/config.py)
#   virby.buildMachine  # one nix.buildMachines entry
#   virby.sshConfig     # /etc/ssh/ssh_config.d/100-virby-vm.conf
#   virby.launchdJob    # the launchd job; must equal supervisor/launchd.py's render_plist
#   virby.defaults      # option defaults, shared with module.nix
#   virby.machinesText  # /etc/nix/machines for the builder, as nix-darwin writes it
#   virby.nestedCheck   # activation lines warning when this Mac cannot nest virtualization
#   virby.debian.*      # where the guest's Debian packages are fetched from (see below)
#
# Option names follow services.virby.*; the few values only the module knows (store paths of
# the guest, vfkit and virby) come in as plain strings.
opts:

let
  inherit (builtins)
    attrNames concatStringsSep elem filter foldl' isAttrs isInt isString match
    toJSON;

  defaults = {
    backend = "vfkit";
    port = 31222;
    cores = 8;
    memory = 6144; # MiB, or a string such as "6GiB"
    diskSize = "100GiB";
    onDemand = {
      enable = true; # idle memory goes back to macOS; off = always on
      ttl = 180; # minutes (Virby's option): becomes stopAfter when stopAfter is not given
      pauseAfter = 60; # seconds idle before the vCPUs stop; null disables
      # stopAfter: seconds idle before the VM powers off; null disables; absent = ttl * 60
    };
    rosetta = false;
    nestedVirtualization = false;
    sharedDirectories = { };
    # The guest's Nix substitutes from these itself (the module sets builders-use-substitutes),
    # so Linux inputs need not pass through the Mac's store. The names nixpkgs/nix-darwin use.
    substituters = [ "https://cache.nixos.org" ];
    trustedPublicKeys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
    debug = false;
    speedFactor = 1;
    allowUserSsh = false;
    readyTimeout = 60;
    sshUser = "builder";
    stateDir = "/var/lib/virby";
    # Under the state dir, not /var/run: macOS empties /var/run at boot and the daemon's user
    # could not recreate a folder there.
    runtimeDir = null; # null = "<stateDir>/run"
    user = "_virby";
    guest = null; # { kernel, initrd, cmdline, disk? } from the guest build
    hypervisor = null; # absolute path to vfkit or qemu-system-aarch64
    virbyExe = "virby";
    configPath = "/etc/virby/config.json";
    extraPath = [ ];
  };

  o = defaults // opts // { onDemand = defaults.onDemand // (opts.onDemand or { }); };
  od = o.onDemand;
  stateDir = o.stateDir;
  runtimeDir = if o.runtimeDir == null then "${stateDir}/run" else o.runtimeDir;

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: as: if cond then as else { };
  optionalString = cond: str: if cond then str else "";
  show = v: if isString v then "\"${v}\"" else toJSON v;

  MiB = 1024 * 1024;
  GiB = 1024 * MiB;
  unitBytes = {
    "" = 1; K = 1024; M = MiB; G = GiB; T = 1024 * GiB;
  };

  # "6GiB" / "6144M" / 6144 -> MiB, or null when malformed (Virby's units: M, MiB, G, GiB).
  memoryMiB =
    let m = if isString o.memory then match " *([0-9]+) *(M|MiB|G|GiB) *" o.memory else null;
    in if isInt o.memory then o.memory
       else if m == null then null
       else (fromDecimal (elemAt m 0)) * (if elemAt m 1 == "G" || elemAt m 1 == "GiB" then 1024 else 1);

  # "100GiB" / "512M" / "2T" / 21474836480 -> bytes, or null. Powers of 1024 throughout, as
  # core/config.py reads them.
  diskBytes =
    let m = if isString o.diskSize then match " *([0-9]+) *([KMGT]?)(i?B)? *" o.diskSize else null;
    in if isInt o.diskSize then o.diskSize
       else if m == null then null
       else (fromDecimal (elemAt m 0)) * unitBytes.${elemAt m 1};

  elemAt = builtins.elemAt;
  fromDecimal = s: builtins.fromJSON (let t = stripZeros s; in if t == "" then "0" else t);
  stripZeros = s: if builtins.substring 0 1 s == "0" then stripZeros (builtins.substring 1 (builtins.stringLength s) s) else s;

  stopAfter = if od ? stopAfter then od.stopAfter else od.ttl * 60;
  pauseAfter = od.pauseAfter;

  tagOk = tag: match "[A-Za-z0-9][A-Za-z0-9_.-]{0,35}" tag != null;
  # the same checks as core/config.py
  substituterOk = u: isString u && match "(https?|file|s3|ssh|ssh-ng)://[^ \t\n\"']+" u != null;
  publicKeyOk = k: isString k && match "[A-Za-z0-9][A-Za-z0-9._-]*:[A-Za-z0-9+/]{43}=" k != null;
  listErrors = name: ok: what: xs:
    if !(builtins.isList xs) then [ "services.virby.${name}: got ${show xs}, expected a list" ]
    else concatLists (builtins.genList (i:
      let x = elemAt xs i; in
      optional (!(ok x)) "services.virby.${name}: got ${show x}, expected ${what}")
      (builtins.length xs));

  errors =
    optional (!(isInt o.port) || o.port < 1024 || o.port > 65535)
      "services.virby.port: got ${show o.port}, expected a port from 1024 to 65535"
    ++ optional (!(elem o.backend [ "vfkit" "qemu" ]))
      "services.virby.backend: got ${show o.backend}, expected \"vfkit\" or \"qemu\""
    ++ optional (!(isInt o.cores) || o.cores < 1 || o.cores > 256)
      "services.virby.cores: got ${show o.cores}, expected 1 to 256"
    ++ optional (memoryMiB == null)
      "services.virby.memory: got ${show o.memory}, expected MiB as a number (6144) or a string with a unit M, MiB, G or GiB (\"6GiB\")"
    ++ optional (memoryMiB != null && (memoryMiB < 1024 || memoryMiB > 1024 * 1024))
      "services.virby.memory: got ${show o.memory}, expected at least 1024 MiB (and at most 1 TiB)"
    ++ optional (diskBytes == null)
      "services.virby.diskSize: got ${show o.diskSize}, expected a size such as \"100GiB\", \"512G\" or \"2T\""
    ++ optional (diskBytes != null && (diskBytes < GiB || diskBytes > 16 * 1024 * GiB))
      "services.virby.diskSize: got ${show o.diskSize}, expected 1GiB to 16TiB"
    ++ optional (!(isInt od.ttl) || od.ttl < 1)
      "services.virby.onDemand.ttl: got ${show od.ttl}, expected minutes, at least 1"
    ++ optional (pauseAfter != null && (!(isInt pauseAfter) || pauseAfter < 1))
      "services.virby.onDemand.pauseAfter: got ${show pauseAfter}, expected seconds (at least 1) or null"
    ++ optional (stopAfter != null && (!(isInt stopAfter) || stopAfter < 1))
      "services.virby.onDemand.stopAfter: got ${show stopAfter}, expected seconds (at least 1) or null"
    ++ optional (isInt pauseAfter && isInt stopAfter && stopAfter <= pauseAfter)
      "services.virby.onDemand.stopAfter: got ${show stopAfter}, expected more than onDemand.pauseAfter (${show pauseAfter}) or null"
    ++ optional (!(isInt o.speedFactor) || o.speedFactor < 1)
      "services.virby.speedFactor: got ${show o.speedFactor}, expected at least 1"
    ++ (if !(isAttrs o.sharedDirectories) then
          [ "services.virby.sharedDirectories: expected an attribute set of tag = absolute path" ]
        else
          concatLists (map (tag:
            let path = o.sharedDirectories.${tag}; in
            optional (!(tagOk tag))
              "services.virby.sharedDirectories.${tag}: the tag must be letters, digits, '_', '.', '-' (at most 36)"
            ++ optional (!(isString path) || builtins.substring 0 1 path != "/")
              "services.virby.sharedDirectories.${tag}: got ${show path}, expected an absolute path")
            (attrNames o.sharedDirectories)));

  concatLists = builtins.concatLists;
  errors' = errors
    ++ listErrors "substituters" substituterOk "a binary cache URL (http://, https://, file://, s3://, ssh:// or ssh-ng://)" o.substituters
    ++ listErrors "trustedPublicKeys" publicKeyOk "a Nix signing key NAME:BASE64 (ed25519)" o.trustedPublicKeys;

  failIfInvalid = v:
    if errors' == [ ] then v else throw ("virby: invalid options:\n" + concatStringsSep "\n" errors');

  # The document core/config.py reads: only keys it knows (it rejects unknown ones).
  config = failIfInvalid ({
    inherit (o) backend port cores rosetta nestedVirtualization sharedDirectories debug
      readyTimeout sshUser substituters trustedPublicKeys;
    memory = memoryMiB;
    diskSize = diskBytes;
    onDemand = { inherit (od) enable; inherit pauseAfter stopAfter; };
    inherit stateDir runtimeDir;
  }
  // optionalAttrs (o.guest != null) {
    guest = { inherit (o.guest) kernel initrd cmdline; }
      // optionalAttrs ((o.guest.disk or null) != null) { inherit (o.guest) disk; };
  }
  // optionalAttrs (o.hypervisor != null) { inherit (o) hypervisor; }
  // optionalAttrs (o.backend == "qemu") { accel = "hvf"; });

  buildMachine = {
    hostName = "virby-vm";
    protocol = "ssh-ng";
    maxJobs = o.cores;
    inherit (o) speedFactor;
    systems = [ "aarch64-linux" ] ++ optional o.rosetta "x86_64-linux";
    # kvm and nixos-test only when the guest really has /dev/kvm; otherwise Nix would route
    # VM tests here and they would fail with "failed to initialize kvm".
    supportedFeatures = [ "benchmark" "big-parallel" ]
      ++ optionals o.nestedVirtualization [ "kvm" "nixos-test" ];
    mandatoryFeatures = [ ];
  };

  # The line Nix reads from /etc/nix/machines, in nix-darwin's (and Determinate's) format: URI,
  # systems, key, maxJobs, speedFactor, supported features, mandatory features, host key. For
  # when nix-darwin does not manage Nix (nix.enable = false) and so writes no machines file.
  machinesText =
    let
      m = buildMachine;
      dash = xs: if xs == [ ] then "-" else concatStringsSep "," xs;
    in
    concatStringsSep " " [
      "${m.protocol}://${m.hostName}" (concatStringsSep "," m.systems) "-"
      (toString m.maxJobs) (toString m.speedFactor)
      (dash (m.supportedFeatures ++ m.mandatoryFeatures)) (dash m.mandatoryFeatures) "-"
    ] + "\n";

  # Nested virtualization needs an M3 or later and macOS 15. Evaluation cannot see the hardware,
  # so kvm/nixos-test are advertised only when the option asks for them, and activation warns
  # on a Mac that cannot give them (vfkit then refuses --nested or the guest has no /dev/kvm,
  # and Nix would route VM tests to a builder that fails them). nix-darwin's activation PATH
  # has neither /usr/sbin nor /usr/bin: absolute paths.
  nestedCheck = { sysctl ? "/usr/sbin/sysctl", swVers ? "/usr/bin/sw_vers" }: ''
    virby_chip=$(${sysctl} -n machdep.cpu.brand_string 2>/dev/null || true)
    virby_macos=$(${swVers} -productVersion 2>/dev/null || true)
    virby_gen=$(printf '%s\n' "$virby_chip" | sed -n 's/^Apple M\([0-9][0-9]*\).*/\1/p')
    if [ -z "$virby_gen" ] || [ "$virby_gen" -lt 3 ] || [ "''${virby_macos%%.*}" -lt 15 ] 2>/dev/null || [ -z "$virby_macos" ]; then
      echo "warning: services.virby.nestedVirtualization: this Mac ($virby_chip, macOS $virby_macos) cannot nest virtualization (needs an Apple M3 or later and macOS 15); the builder advertises kvm and nixos-test, so Nix will send it VM tests that fail. Set nestedVirtualization = false." >&2
    fi
  '';

  clientKey = "${stateDir}/ssh_user_ed25519_key";
  # The copy for members of the `virby` group: owned by the daemon's user, mode 0640. OpenSSH
  # accepts a group-readable key only when the reader does not own it, which holds for them and
  # for root (nix-daemon), and never for "everyone".
  sharedKey = "${clientKey}.shared";

  # ConnectTimeout also bounds ssh's wait for the server's banner, which the forwarder delays
  # until the VM is up: give it the guest's whole start budget and some. Same text as
  # `virby ssh-config` prints (supervisor/cli.py; a test compares the two).
  sshConfig = ''
    Host virby-vm
      HostName 127.0.0.1
      Port ${toString o.port}
      User ${o.sshUser}
      IdentityFile ${if o.allowUserSsh then sharedKey else clientKey}
      IdentitiesOnly yes
      GlobalKnownHostsFile ${stateDir}/ssh_known_hosts
      UserKnownHostsFile /dev/null
      HostKeyAlias virby-vm-key
      StrictHostKeyChecking yes
      ConnectTimeout ${toString (o.readyTimeout + 15)}
      BatchMode yes
  '' + optionalString muxFits ''
    Match originalhost virby-vm localuser ${concatStringsSep "," muxUsers}
      ControlMaster auto
      ControlPath ${runtimeDir}/ssh-%C
      ControlPersist ${toString controlPersist}
  '';

  # One SSH connection for many derivations (supervisor/sshconfig.py says why): shared by the
  # Nix daemon's user (root) and the daemon's own user, who may create sockets in the runtime
  # dir; ssh binds <ControlPath>.<16 characters>, %C is 40: it must fit in 104 bytes.
  muxUsers = [ "root" ] ++ optional (o.user != null && o.user != "root") o.user;
  muxFits = builtins.stringLength runtimeDir + 5 + 40 + 17 < 104;
  idleFor = if pauseAfter != null then pauseAfter else stopAfter;
  controlPersist = if idleFor == null then 30
    else let half = idleFor / 2; in if half < 1 then 1 else if half > 30 then 30 else half;

  isAbsolute = p: isString p && builtins.substring 0 1 p == "/";
  dedup = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  searchPath = concatStringsSep ":" (dedup (filter (d: d != "" && d != ".") (
    o.extraPath
    ++ [ (dirOf o.virbyExe) ]
    ++ optional (isAbsolute o.hypervisor) (dirOf o.hypervisor)
    ++ [ "/run/current-system/sw/bin" "/nix/var/nix/profiles/default/bin"
         "/usr/bin" "/bin" "/usr/sbin" "/sbin" ])));

  # Mirrors supervisor/launchd.py (a test compares the two): ExitTimeOut is the longest
  # watcher graceful timeout in supervisor/circus_ini.py (vm, 45 s) + 10.
  launchdJob = {
    Label = "org.nixos.virby";
    ProgramArguments = [ o.virbyExe "run" "--config" o.configPath ];
    RunAtLoad = true;
    KeepAlive = true;
    ExitTimeOut = 55;
    WorkingDirectory = stateDir;
    StandardOutPath = "${stateDir}/logs/launchd.out";
    StandardErrorPath = "${stateDir}/logs/launchd.err";
    ProcessType = "Standard";
    EnvironmentVariables = { PATH = searchPath; };
    SoftResourceLimits = { NumberOfFiles = 4096; };
  } // optionalAttrs (o.user != null) { UserName = o.user; };

  # Where each Debian package of the guest is fetched from, with no host written here. A lock
  # entry names its archive in its URLs: mirror://debian/<pool path> (nixpkgs' fetchurl knows
  # that mirror list), or mirror://debian-security/pool/updates/<...> (no list in nixpkgs), and
  # always snapshot://<archive>/<timestamp>/<pool path>, which Debian's snapshot service keeps
  # after the pool drops a superseded version. That service's base URL is taken from nixpkgs
  # too: vmTools.debDistros' urlPrefix is "<base>/archive/debian/<timestamp>".
  debian = rec {
    # debDistros (pkgs.vmTools.debDistros) -> "<base>" or null when no entry has that layout.
    snapshotBase = debDistros:
      let
        prefixes = filter isString
          (map (d: if isAttrs d then d.urlPrefix or null else null) (builtins.attrValues debDistros));
        bases = filter (m: m != null)
          (map (p: match "(https?://[^/]+(/[^/]+)*)/archive/debian/[0-9]{8}T[0-9]{6}Z/?" p) prefixes);
      in
      if bases == [ ] then null else builtins.head (builtins.head bases);

    # One lock package -> its URLs, most direct first; fetchurl tries them in order.
    #  - security archive: the override if given; then the main archive's pool, where a
    #    security update lands unchanged at the next point release (pool/updates/main/... in
    #    debian-security is pool/main/... in debian); then the snapshot.
    #  - main archive: mirror://debian/ (nixpkgs' list), then the snapshot.
    urls = { securityMirror ? null, snapshotBase ? null }: p:
      let
        strip = s: if builtins.substring (builtins.stringLength s - 1) 1 s == "/"
          then builtins.substring 0 (builtins.stringLength s - 1) s else s;
        one = u:
          let
            mainM = match "mirror://debian/(.+)" u;
            secM = match "mirror://debian-security/(.+)" u;
            snapM = match "snapshot://([a-z-]+)/(.+)" u;
            pointRelease = if secM == null then null else match "pool/updates/(.+)" (builtins.head secM);
          in
          if mainM != null then [ u ]
          else if secM != null then
            optional (securityMirror != null) "${strip securityMirror}/${builtins.head secM}"
            ++ optional (pointRelease != null) "mirror://debian/pool/${builtins.head pointRelease}"
          else if snapM != null then
            optional (snapshotBase != null)
              "${strip snapshotBase}/archive/${builtins.head snapM}/${elemAt snapM 1}"
          else [ u ];
      in
      concatLists (map one p.urls);
  };

in
{
  errors = errors';
  inherit defaults config buildMachine sshConfig launchdJob stateDir runtimeDir
    clientKey sharedKey machinesText nestedCheck debian;
  memoryMiB = memoryMiB;
  diskBytes = diskBytes;
}
