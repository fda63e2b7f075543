# Virby itself, from this repository's setup.cfg (the version is read from there too). It carries
# the guest's scripts and lock (image/guest/, image/guest.lock.json) where `virby guest build`
# looks for them (virby/image/ next to the code), so the Mac builds its guest with this package.
{ lib, python3Packages }:

let
  ps = python3Packages;
  setupCfg = builtins.readFile ../setup.cfg;
  version = builtins.head (builtins.match ".*\nversion = ([^\n]+)\n.*" setupCfg);
  # nixpkgs names qemu.qmp "qemu-qmp" where it has it; only the qemu backend needs it.
  hasQmp = ps ? qemu-qmp;
in
ps.buildPythonApplication {
  pname = "virby";
  inherit version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../setup.cfg ../pyproject.toml ../README.md ../core ../supervisor ../workers ../guestbuild ../setup.py
      ../image/guest ../image/guest.lock.json
    ];
  };

  build-system = [ ps.setuptools ps.wheel ];
  dependencies = with ps; [
    circus tornado pyzmq psutil paramiko sshtunnel click cryptography pyelftools zstandard
  ] ++ lib.optional hasQmp ps.qemu-qmp;

  # guestbuild/spec.py finds image/ beside itself: <site-packages>/virby/image.
  postInstall = ''
    image=$out/${ps.python.sitePackages}/virby/image
    mkdir -p $image
    cp -r image/guest image/guest.lock.json $image/
  '';

  # setup.cfg pins what PyPI serves (circus==0.19.0 ...); take nixpkgs' versions instead.
  pythonRelaxDeps = true;
  pythonRemoveDeps = lib.optional (!hasQmp) "qemu.qmp";

  pythonImportsCheck = [
    "virby.core.config" "virby.guestbuild" "virby.workers.backends.vfkit"
  ];

  meta = {
    description = "A Linux build machine on demand for Nix users, behind one loopback SSH port";
    license = lib.licenses.mit;
    mainProgram = "virby";
  };
}
