# The only stand-ins in the nix-darwin evaluation: packages. Each is a real (never built)
# derivation, so store paths, fixed-output hashes and string contexts are computed as Nix would
# (a malformed sha256 fails here). Nothing else of nixpkgs is needed.
#
# Two nixpkgs interfaces the guest's downloads rely on are modelled as nixpkgs has them, with
# ".invalid" hosts (which name nothing) in place of nixpkgs' own:
#   - fetchurl (pkgs/build-support/fetchurl/default.nix): `urls` are kept as given in the
#     derivation, mirror://<site>/ included, and resolved against mirrors.nix by the builder;
#     `fetchurl.resolveUrl` resolves one at evaluation, and throws for an unknown site. Its
#     mirror list has `debian` (a list of "<base>/debian/") and no list for the security or
#     the snapshot archive.
#   - vmTools.debDistros (pkgs/build-support/vm/default.nix): per distro { name, fullName,
#     packagesList(s), urlPrefix, packages }; the Debian ones' urlPrefix is
#     "<snapshot service>/archive/debian/<timestamp>", Ubuntu's "<its snapshot>/ubuntu/<ts>".
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

  mirrors = {
    debian = [ "https://debian.invalid/debian/" ]; # one: the tests count URLs
    ubuntu = [ "https://ubuntu.invalid/ubuntu/" ];
  };
  resolveUrl = url:
    let
      mirrorSplit = builtins.match "mirror://([[:alpha:]]+)/(.+)" url;
      mirrorName = builtins.head mirrorSplit;
      mirrorList = mirrors.${mirrorName} or (throw "unknown mirror:// site ${mirrorName}");
    in
    if mirrorSplit == null then [ url ]
    else map (m: m + builtins.elemAt mirrorSplit 1) mirrorList;

  snapshot = "https://snapshot.invalid"; # where nixpkgs has Debian's snapshot service
  debDistro = name: release: arch: ts: {
    name = "debian-${release}-${name}-${arch}";
    fullName = "Debian ${release} (${arch})";
    packagesLists = [
      (pkgs.fetchurl {
        url = "${snapshot}/archive/debian/${ts}/dists/${name}/main/binary-${arch}/Packages.xz";
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
      })
    ];
    urlPrefix = "${snapshot}/archive/debian/${ts}";
    packages = [ "base-passwd" "dpkg" ];
  };

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
    # Fixed-output, as nixpkgs' fetchurl: the sha256 must be a valid hash; `urls` kept as
    # given (mirror:// resolved at build time), and `fetchurl.resolveUrl` beside the function.
    fetchurl = {
      __functor = _: { name ? null, url ? "", urls ? [ ], sha256 }:
        let urls' = if urls != [ ] then urls else [ url ]; in
        drv (if name != null then name else baseNameOf (builtins.head urls')) {
          urls = urls';
          outputHashMode = "flat";
          outputHashAlgo = "sha256";
          outputHash = sha256;
        };
      inherit resolveUrl;
    };

    vmTools = {
      debDistros = {
        # Ubuntu: another snapshot layout, never to be taken for Debian's (lib.nix is tested with
        # it sorting first too).
        ubuntu2404x86_64 = {
          name = "ubuntu-24.04-noble-amd64";
          fullName = "Ubuntu 24.04 Noble (amd64)";
          urlPrefix = "https://ubuntu-snapshot.invalid/ubuntu/20260101T000000Z";
          packages = [ "dpkg" ];
        };
        debian12x86_64 = debDistro "bookworm" "12.12" "amd64" "20260105T082626Z";
        debian13x86_64 = debDistro "trixie" "13.2" "amd64" "20260105T082626Z";
      };
      # The rest of vmTools builds Linux VMs: never reached from a Mac's evaluation.
      runInLinuxVM = throw "stub pkgs: vmTools.runInLinuxVM is not modelled";
    };
  };
in
pkgs
