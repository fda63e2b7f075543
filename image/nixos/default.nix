# The vfkit guest for direct kernel boot: evaluate image/nixos/guest.nix (plus any extra
# modules) for aarch64-linux and return what the host needs to boot it.
#
#   import ./image/nixos { nixpkgs = <nixpkgs>; extraModules = [ ./my-guest-tweaks.nix ]; }
#   => { kernel, initrd, cmdline, disk, toplevel, bundle }
#
# kernel, initrd and disk (the store image) are paths inside store outputs; cmdline is a string
# holding init=<toplevel>/init. `bundle` links all of them into one output (kernel, initrd,
# store.img, cmdline): what a binary cache serves and `nix build .#guest` shows.
{ nixpkgs, extraModules ? [ ], system ? "aarch64-linux" }:

let
  eval = import "${nixpkgs}/nixos/lib/eval-config.nix" {
    system = null; # the platform comes from nixpkgs.hostPlatform below
    modules = [ ./guest.nix { nixpkgs.hostPlatform = system; } ] ++ extraModules;
  };
  inherit (eval) pkgs;
  guest = eval.config.system.build.virby;
in
guest // {
  toplevel = eval.config.system.build.toplevel;
  bundle = pkgs.runCommand "virby-guest" { inherit (guest) cmdline; } ''
    mkdir -p $out
    ln -s ${guest.kernel} $out/kernel
    ln -s ${guest.initrd} $out/initrd
    ln -s ${guest.disk} $out/store.img
    printf '%s\n' "$cmdline" > $out/cmdline
  '';
}
