# The Mac's default guest, with no Linux builder: the Debian packages named in the lock
# (image/guest.lock.json), each fetched by a fixed-output derivation, then assembled on the Mac
# itself by Virby's own Python (`virby guest build --offline`). Only the Nix binary cache (for
# Python and Virby's dependencies) and Debian's archives are needed, all found through what
# nixpkgs already knows (no host is named in this repository):
#   - mirror://debian/ through fetchurl's own mirror list;
#   - Debian's snapshot service, whose base URL nixpkgs' vmTools.debDistros carry
#     ("<base>/archive/debian/<timestamp>"): every lock entry's snapshot://<archive>/<ts>/<path>
#     becomes "<base>/archive/<archive>/<ts>/<path>", which outlives the pool's superseded
#     versions and also serves the security archive;
#   - packages from the security archive also try the main archive's pool (a security update
#     lands there unchanged at the next point release), and `securityMirror` first if given.
# nix/lib.nix (`debian.urls`, `debian.snapshotBase`) computes the URLs.
#
#   pkgs.callPackage ./guest.nix { virby = <the virby package>; }
#   => a store path holding vmlinuz (the uncompressed arm64 Image), initrd.img, manifest.json;
#      passthru: cmdline, debs (the fixed-output downloads), lock, snapshotBase, securityPackages
{ lib, fetchurl, runCommand, virby
, vmTools ? null # only its debDistros' urlPrefix is read (no VM is built)
, lockFile ? ../image/guest.lock.json
, arch ? "aarch64"
, variant ? "nix"
  # Base URL of a Debian security archive mirror, tried first for the lock's
  # mirror://debian-security/ packages (optional).
, securityMirror ? null
  # Base URL of Debian's snapshot service (it serves archive/<archive>/<timestamp>/...);
  # null: the one nixpkgs' vmTools.debDistros use.
, snapshotBase ? null
}:

let
  debian = (import ./lib.nix { }).debian;
  lock = builtins.fromJSON (builtins.readFile lockFile);
  entry = lock.arches.${arch} or (throw "virby guest: ${toString lockFile} has no ${arch} guest");
  packages = builtins.filter (p: builtins.elem variant p.variants) entry.packages;
  fromSecurity = p: lib.hasPrefix "mirror://debian-security/" (builtins.head p.urls);
  securityPackages = map (p: p.name) (builtins.filter fromSecurity packages);

  snapshot =
    if snapshotBase != null then snapshotBase
    else
      # Read-only use of vmTools (its Linux VM parts are never forced); should some nixpkgs
      # fail to evaluate it on a Mac, the module warns and asks for debianSnapshot instead.
      let found = builtins.tryEval
        (if vmTools != null && vmTools ? debDistros then debian.snapshotBase vmTools.debDistros else null);
      in if found.success then found.value else null;
  urlsOf = debian.urls { inherit securityMirror; snapshotBase = snapshot; };

  # The store name is the package's (Debian file names may hold '~', which a store path may not).
  fetch = p: fetchurl {
    name = "${p.name}_${p.arch}.deb";
    urls =
      let us = urlsOf p; in
      if us != [ ] then us
      else throw "virby guest: no URL for ${p.name}: set services.virby.debianSnapshot (or debianSecurityMirror)";
    inherit (p) sha256;
  };
  debs = map (p: { inherit (p) sha256; deb = fetch p; }) packages;

  cmdline = "console=hvc0 panic=-1 virby.net=dhcp"; # vfkit NAT: the address comes by DHCP
in
runCommand "virby-guest-${arch}-${variant}"
  {
    nativeBuildInputs = [ virby ];
    passthru = {
      inherit cmdline lock securityPackages;
      snapshotBase = snapshot;
      debs = map (d: d.deb) debs;
    };
  }
  ''
    # The download cache `virby guest build` reads: <sha256>.deb, here links to the downloads.
    mkdir -p cache
    ${lib.concatMapStrings (d: "ln -s ${d.deb} cache/${d.sha256}.deb\n") debs}
    export HOME=$PWD XDG_CACHE_HOME=$PWD/xdg
    virby guest build --arch ${arch} --variant ${variant} --lock ${lockFile} \
      --offline --cache cache --out $out
  ''
