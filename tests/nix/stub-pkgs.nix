# The only stand-ins in the nix-darwin evaluation: packages. Each is a real (never built)
# derivation, so store paths, fixed-output hashes and string contexts are computed as Nix would
# (a malformed sha256 fails here). Nothing else of nixpkgs is needed.
{ lib, system ? "aarch64-darwin" }:

let
  drv = name: extra: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo stub; exit 1" ];
  } // extra);
  withMeta = mainProgram: d: d // { meta = { inherit mainProgram; }; pname = mainProgram; };

  # Packages nix-darwin's own daemons name, forced with the launchd activation phase.
  tools = lib.genAttrs [ "gnugrep" "coreutils" "jq" ] (n: withMeta n (drv n { }));

  pkgs = tools // {
    inherit lib;
    path = throw "stub pkgs: nixpkgs itself is not here (the NixOS guest needs it)";
    stdenv.shell = "${drv "bash-5.3" { }}/bin/bash";
    stdenv.hostPlatform = {
      inherit system;
      isDarwin = lib.hasSuffix "-darwin" system;
      isLinux = lib.hasSuffix "-linux" system;
      isAarch64 = lib.hasPrefix "aarch64-" system;
    };
    callPackage = f: overrides:
      let fn = if builtins.isFunction f then f else import f;
      in fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // overrides);

    virby = withMeta "virby" (drv "virby-0.1.0" { });
    vfkit = withMeta "vfkit" (drv "vfkit-0.6.1" { });
    qemu = drv "qemu-10.0.0" { };
    # nix-darwin's own defaults that the forced values reach (nix.package for the daemon).
    nix = withMeta "nix" (drv "nix-2.31.2" { });

    writeText = name: text: drv name { inherit text; };
    writeScript = name: text: drv name { inherit text; };
    runCommand = name: env: script:
      (drv name (builtins.removeAttrs env [ "passthru" ] // { buildCommand = script; }))
      // (env.passthru or { });
    # Fixed-output, as nixpkgs' fetchurl: the sha256 must be a valid hash (the tests check the
    # URLs: mirror://debian/, or the security mirror the user configured).
    fetchurl = { name, urls, sha256 }:
      drv name {
        inherit urls;
        outputHashMode = "flat";
        outputHashAlgo = "sha256";
        outputHash = sha256;
      };
  };
in
pkgs
