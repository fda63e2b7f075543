# The Mac's default guest, with no Linux builder: the Debian packages named in the lock
# (image/guest.lock.json), each fetched by a fixed-output derivation, then assembled on the Mac
# itself by Virby's own Python (`virby guest build --offline`). Only the Nix binary cache (for
# Python and Virby's dependencies) and Debian's archives are needed: mirror://debian/ through
# nixpkgs' mirror list, the security archive through `securityMirror` when the lock uses it.
#
#   pkgs.callPackage ./guest.nix { virby = <the virby package>; }
#   => a store path holding vmlinuz (the uncompressed arm64 Image), initrd.img, manifest.json;
#      passthru: kernel, initrd, cmdline, debs (the fixed-output downloads), lock
{ lib, fetchurl, runCommand, virby
, lockFile ? ../image/guest.lock.json
, arch ? "aarch64"
, variant ? "nix"
  # Base URL of Debian's security archive, for the lock's mirror://debian-security/ packages:
  # nixpkgs' fetchurl has a mirror list for mirror://debian/ but none for the security archive.
, securityMirror ? null
}:

let
  lock = builtins.fromJSON (builtins.readFile lockFile);
  entry = lock.arches.${arch} or (throw "virby guest: ${toString lockFile} has no ${arch} guest");
  packages = builtins.filter (p: builtins.elem variant p.variants) entry.packages;
  fromSecurity = p: lib.hasPrefix "mirror://debian-security/" (builtins.head p.urls);
  securityPackages = map (p: p.name) (builtins.filter fromSecurity packages);

  # No host named here: nixpkgs' fetchurl resolves mirror://debian/ from its own mirror list;
  # the security archive's base comes from the user (securityMirror). The store name is the
  # package's (Debian file names may hold '~', which a store path may not).
  fetch = p: fetchurl {
    name = "${p.name}_${p.arch}.deb";
    urls =
      if !(fromSecurity p) then [ "mirror://debian/${p.path}" ]
      else if securityMirror != null then [ "${lib.removeSuffix "/" securityMirror}/${p.path}" ]
      else throw "virby guest: ${p.name} comes from Debian's security archive: set services.virby.debianSecurityMirror";
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
