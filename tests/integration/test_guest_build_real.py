"""`virby guest build` for real: Debian 13 packages from the committed lock, downloaded from the
mirror the host's apt sources name (cached by sha256), both arches, with a PATH that holds no
apt-get, apt-cache, dpkg or cpio: the builder needs none of them (nor root, nor Linux tools)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virby.guestbuild.lock import load

pytestmark = pytest.mark.integration

DEB_TOOLS = ("apt-get", "apt-cache", "dpkg", "dpkg-deb", "cpio")


def guest_build(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    bare = tmp_path / "bin"  # the only dir on PATH: nothing in it
    bare.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(bare)}
    for tool in DEB_TOOLS:
        assert shutil.which(tool, path=env["PATH"]) is None
    return subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "guest", "build", *args],
                          env=env, capture_output=True, text=True, timeout=900, check=False)


def cpio_names(initrd: bytes) -> set[str]:
    data, pos = gzip.decompress(initrd), 0
    names: set[str] = set()
    while True:
        assert data[pos:pos + 6] == b"070701", f"not a newc member at {pos}"
        namesize, filesize = int(data[pos + 94:pos + 102], 16), int(data[pos + 54:pos + 62], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.add(name)
        pos += 110 + namesize
        pos += (-pos) % 4 + filesize
        pos += (-pos) % 4


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_builder_guest_builds_without_apt_dpkg_or_cpio(tmp_path: Path, arch: str) -> None:
    out = tmp_path / "guest"
    proc = guest_build(tmp_path, "--arch", arch, "--variant", "nix", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    lock = load()
    assert manifest["lock"] == lock.sha256 and manifest["kernelPackage"] == lock.arches[arch].kernel.package
    kernel = (out / "vmlinuz").read_bytes()
    if arch == "aarch64":
        assert kernel[0x38:0x3C] == b"ARM\x64"  # the uncompressed Image vfkit needs
    else:
        assert kernel[0x202:0x206] == b"HdrS"
    names = cpio_names((out / "initrd.img").read_bytes())
    for path in ("init", "etc/rc", "usr/bin/busybox", "usr/sbin/dropbear", "usr/bin/nix",
                 "usr/sbin/mke2fs", "usr/sbin/resize2fs", "etc/nix/nix.conf",
                 "usr/lib/modules/virtio_blk.ko"):
        assert path in names, path
    assert not [n for n in names if n.startswith("usr/share/doc") or n.endswith("perl")]


def test_the_same_lock_gives_the_same_bytes(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        proc = guest_build(tmp_path, "--arch", "x86_64", "--variant", "base", "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        digests.append(json.loads((tmp_path / name / "manifest.json").read_text())["sha256"])
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "initrd.img").read_bytes() == (tmp_path / "b" / "initrd.img").read_bytes()
