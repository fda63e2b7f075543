# Evaluates nix/module.nix inside a darwin system configuration and returns, fully forced by
# `nix-instantiate --eval --strict --json`, everything the module writes: the launchd daemon
# (nix-darwin's rendered plist too), each /etc file, nix.buildMachines, the users and groups,
# the activation script and the assertions that fail.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-darwin.nix \
#     --arg nixDarwin /path/to/nix-darwin --arg nixpkgsLib /path/to/nixpkgs.lib \
#     --argstr settings '{"rosetta": true}'
#
# Without nixDarwin/nixpkgsLib it runs on ./darwin-standin.nix: a hand-written stand-in of the
# module system and of the nix-darwin options the module sets (what CI can run offline).
{ nixDarwin ? null, nixpkgsLib ? null, settings ? "{}"
, what ? "all" # or "assertions": only the failed assertions (what darwin-rebuild shows first)
}:

let
  real = nixDarwin != null;
  standin = import ./darwin-standin.nix;
  lib = if nixpkgsLib != null then import (nixpkgsLib + "/lib") else standin.lib;
  pkgs = import ./stub-pkgs.nix { inherit lib; };

  virbySettings = enable: {
    inherit enable;
    package = pkgs.virby;
    guestLock = ./guest.lock.sample.json;
    # The sample lock's kernel comes from the security archive; ".invalid" names no real host.
    debianSecurityMirror = "http://security.invalid/debian-security/";
  } // builtins.fromJSON settings;

  system = enable:
    let
      modules = [
        ../../nix/module.nix
        { services.virby = virbySettings enable; }
      ];
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
  buildMachines = on.nix.buildMachines;
  distributedBuilds = on.nix.distributedBuilds;
  users = {
    user = on.users.users._virby;
    group = on.users.groups.virby;
    inherit (on.users) knownUsers knownGroups;
  };
  activation = on.system.activationScripts.postActivation.text;
  guest = "${on.system.build.virbyGuest}";
  guestDebs = map (d: { path = "${d}"; inherit (d) urls outputHash; }) on.system.build.virbyGuest.debs;
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
