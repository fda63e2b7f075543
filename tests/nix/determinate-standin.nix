# A stand-in for Determinate's nix-darwin module (DeterminateSystems/determinate,
# modules/nix-darwin/default.nix), for the stand-in darwin (./darwin-standin.nix): the part of it
# that decides where a build machine goes. Real Determinate is evaluated by the same harness when
# a checkout is given (eval-darwin.nix, `determinate`). What it does, as the real one:
#   - determinateNix.enable defaults to true once the module is imported;
#   - it forces nix.enable = false, so nix-darwin writes neither nix.conf nor nix/machines;
#   - it writes /etc/nix/machines itself from determinateNix.buildMachines (same format), and
#     /etc/nix/nix.custom.conf from determinateNix.customSettings (freeform "key = value").
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.determinateNix;
  opt = type: default: mkOption { inherit type default; };
  nullable = t: opt (types.nullOr t) null;
  value = v:
    if builtins.isBool v then (if v then "true" else "false")
    else if builtins.isList v then lib.concatStringsSep " " (map toString v)
    else toString v;
in
{
  options.determinateNix = {
    enable = opt types.bool true;
    distributedBuilds = opt types.bool false;
    buildMachines = opt (types.listOf (types.submodule (_: {
      hostName = mkOption { type = types.str; };
      protocol = opt (types.enum [ null "ssh" "ssh-ng" ]) "ssh";
      system = nullable types.str;
      systems = opt (types.listOf types.str) [ ];
      sshUser = nullable types.str;
      sshKey = nullable types.str;
      maxJobs = opt types.int 1;
      speedFactor = opt types.int 1;
      mandatoryFeatures = opt (types.listOf types.str) [ ];
      supportedFeatures = opt (types.listOf types.str) [ ];
      publicHostKey = nullable types.str;
    }))) [ ];
    customSettings = opt (types.attrsOf types.anything) { };
  };

  config = lib.mkIf cfg.enable {
    nix.enable = lib.mkForce false;
    environment.etc."nix/nix.custom.conf".text = lib.concatStringsSep "\n"
      (map (k: "${k} = ${value cfg.customSettings.${k}}") (builtins.attrNames cfg.customSettings));
    environment.etc."nix/machines" = lib.mkIf (cfg.buildMachines != [ ]) {
      text = (import ./darwin-standin.nix).machinesText cfg.buildMachines;
    };
  };
}
