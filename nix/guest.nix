# The Mac's default guest, with no Linux builder: the Debian packages named in the lock
# (image/guest.lock.json), each fetched by a fixed-output derivation from Debian's mirror, then
# assembled on the Mac itself by Virby's own Python (`virby guest build --offline`). Only
# cache.nixos.org (for Python and Virby's dependencies) and the Debian mirror are needed, so the
# first `darwin-rebuild switch` already gets a bootable guest.
#
#   pkgs.callPackage ./guest.nix { virby = <the virby package>; }
#   => a store path holding vmlinuz (the uncompressed arm64 Image), initrd.img, manifest.json;
#      passthru: kernel, initrd, cmdline, debs (the fixed-output downloads), lock
{ lib, fetchurl, runCommand, virby
, lockFile ? ../image/guest.lock.json
, arch ? "aarch64"
, variant ? "nix"
}:

let
  lock = builtins.fromJSON (builtins.readFile lockFile);
  entry = lock.arches.${arch} or (throw "virby guest: ${toString lockFile} has no ${arch} guest");
  packages = builtins.filter (p: builtins.elem variant p.variants) entry.packages;

  # The URL names no host: nixpkgs' fetchurl resolves mirror://debian/ from its mirror list.
  # The name is the package's (Debian file names may hold '~', which a store path may not).
  fetch = p: fetchurl {
    name = "${p.name}_${p.arch}.deb";
    urls = [ "mirror://debian/${p.path}" ];
    inherit (p) sha256;
  };
  debs = map (p: { inherit (p) sha256; deb = fetch p; }) packages;

  cmdline = "console=hvc0 panic=-1";
in
runCommand "virby-guest-${arch}-${variant}"
  {
    nativeBuildInputs = [ virby ];
    passthru = {
      inherit cmdline lock;
      debs = map (d: d.deb) debs;
    };
  }
  ''
    # The download cache `virby guest build` reads: <sha256>.deb, here links to the downloads.
    mkdir -p cache image
    ${lib.concatMapStrings (d: "ln -s ${d.deb} cache/${d.sha256}.deb\n") debs}
    cp ${lockFile} image/guest.lock.json
    export HOME=$PWD XDG_CACHE_HOME=$PWD/xdg
    virby guest build --arch ${arch} --variant ${variant} --offline --cache cache --out $out
  ''
