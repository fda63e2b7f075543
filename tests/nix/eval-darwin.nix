# Evaluates nix/module.nix inside a darwin system configuration and returns, fully forced by
# `nix-instantiate --eval --strict --json`, everything the module writes: the launchd daemon
# (nix-darwin's rendered plist too), each /etc file, nix.buildMachines, the users and groups,
# the activation script and the assertions that fail.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-darwin.nix \
#     --arg nixDarwin /path/to/nix-darwin --arg nixpkgsLib /path/to/nixpkgs.lib \
#     --argstr settings '{"rosetta": true}' --argstr nix determinate --arg determinate /path/to/it
#
# Without nixDarwin/nixpkgsLib it runs on ./darwin-standin.nix: a hand-written stand-in of the
# module system and of the nix-darwin options the module sets (what CI can run offline).
{ nixDarwin ? null, nixpkgsLib ? null, settings ? "{}"
, what ? "all" # or "assertions": only the failed assertions (what darwin-rebuild shows first)
  # Which Nix the Mac runs: "nix-darwin" (nix-darwin manages it, its default), "unmanaged"
  # (nix.enable = false: Determinate Nix without its module, or any Nix nix-darwin leaves
  # alone), "determinate" (Determinate's nix-darwin module imported).
, nix ? "nix-darwin"
, determinate ? null # a checkout of DeterminateSystems/determinate; else ./determinate-standin.nix
, extraModule ? null # a file holding one more module (the README's example)
  # true: services.virby.enable = true and nothing else (with the package the flake's
  # darwinModules.default gives, and the repository's own guest lock): a first switch.
, alone ? false
}:

let
  real = nixDarwin != null;
  standin = import ./darwin-standin.nix;
  lib = if nixpkgsLib != null then import (nixpkgsLib + "/lib") else standin.lib;
  pkgs = import ./stub-pkgs.nix { inherit lib; };

  virbySettings = enable:
    if alone then { inherit enable; package = lib.mkDefault pkgs.virby; }
    else {
      inherit enable;
      package = pkgs.virby;
      guestLock = ./guest.lock.sample.json;
    } // builtins.fromJSON settings;

  nixModules = {
    nix-darwin = [ ];
    unmanaged = [{ nix.enable = false; }];
    determinate = [
      (if determinate != null then determinate + "/modules/nix-darwin/default.nix"
       else ./determinate-standin.nix)
    ];
  }.${nix};

  system = enable:
    let
      modules = [
        ../../nix/module.nix
        { services.virby = virbySettings enable; }
      ] ++ nixModules ++ (if extraModule != null && enable then [ extraModule ] else [ ]);
    in
    if real then
      (import (nixDarwin + "/eval-config.nix") {
        inherit lib;
        modules = modules ++ [{
          _module.args.pkgs = lib.mkForce pkgs;
          nixpkgs.hostPlatform = "aarch64-darwin";
          system.stateVersion = 6;
        }];
      }).config
    else standin.eval { inherit lib pkgs modules; };

  on = system true;
  off = system false;

  # The /etc files the module adds: those of the enabled system that the disabled one lacks.
  etcNames = builtins.filter (n: !(off.environment.etc ? ${n})) (builtins.attrNames on.environment.etc);
  etcFile = n: let f = on.environment.etc.${n}; in {
    inherit (f) text;
    source = "${f.source}";
  };
  failed = builtins.filter (a: !a.assertion) on.assertions;
  evaluatedIn = if real then "nix-darwin" else "stand-in";
in
if what == "assertions" then { inherit evaluatedIn; failedAssertions = map (a: a.message) failed; }
else
{
  inherit evaluatedIn;
  etc = lib.genAttrs etcNames etcFile;
  launchd = on.launchd.daemons.virby.serviceConfig;
  plist = if real then on.environment.launchDaemons."org.nixos.virby.plist".text else null;
  nixEnable = on.nix.enable;
  # nix-darwin throws on reading its unset nix.* defaults when it does not manage Nix.
  buildMachines = if on.nix.enable then on.nix.buildMachines else null;
  distributedBuilds = if on.nix.enable then on.nix.distributedBuilds else null;
  buildersUseSubstitutes = if on.nix.enable then on.nix.settings.builders-use-substitutes or null else null;
  determinateNix = if on ? determinateNix then {
    inherit (on.determinateNix) enable distributedBuilds;
    buildMachines = map (m: { inherit (m) hostName protocol systems maxJobs supportedFeatures; })
      on.determinateNix.buildMachines;
    buildersUseSubstitutes = on.determinateNix.customSettings.builders-use-substitutes or null;
  } else null;
  # What Nix reads: /etc/nix/machines, whoever wrote it.
  machines = on.environment.etc."nix/machines".text or null;
  nixCustomConf = on.environment.etc."nix/nix.custom.conf".text or null;
  users = {
    user = on.users.users._virby;
    group = on.users.groups.virby;
    inherit (on.users) knownUsers knownGroups;
  };
  activation = on.system.activationScripts.postActivation.text;
  guest = "${on.system.build.virbyGuest}";
  guestDebs = map (d: {
    path = "${d}";
    inherit (d) urls outputHash;
    # Every URL fetchurl would try, mirror:// resolved as nixpkgs' fetchurl resolves it.
    resolved = builtins.concatMap pkgs.fetchurl.resolveUrl d.urls;
  }) on.system.build.virbyGuest.debs;
  snapshotBase = on.system.build.virbyGuest.snapshotBase;
  failedAssertions = map (a: a.message) failed;
  # nix-darwin runs its activation phases in a fixed order (modules/system/activation-scripts.nix):
  # groups, users, ..., etc, ..., launchd (loads the daemons), ..., postActivation.
  launchdPhase = on.system.activationScripts.launchd.text;
  warnings = builtins.filter (w: lib.hasInfix "virby" w) on.warnings;
  # What nix-darwin turns users.* into (dscl commands run at activation), virby's lines only.
  usersScript = if real
    then builtins.filter (l: lib.hasInfix "virby" l) (lib.splitString "\n" on.system.activationScripts.users.text)
    else [ ];
}
