"""Rosetta's path for real, with a stand-in: the guest's rc.d/rosetta.sh registers whatever sits
at /mnt/rosetta/rosetta for x86_64 ELF. Here no hypervisor shares Rosetta, so Debian's arm64
`qemu-x86_64` (static, from trixie's qemu-user) is appended to the aarch64 guest's initrd at
that path, and an x86_64 static busybox (trixie's busybox-static for amd64) runs in the aarch64
guest through it. Both come from the Debian mirror through the guest builder's index reader,
verified by sha256, cached with the guest's packages."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testing.harness import Instance
from virby.core import cpio
from virby.guestbuild import builder, locker, mirrors

pytestmark = pytest.mark.e2e


def debian_file(deb_arch: str, package: str, path: str) -> bytes:
    bases = mirrors.bases()
    index = locker.fetch_index(bases, deb_arch, lambda message: None)
    tree = locker.Unpacker(bases, builder.default_cache(), lambda message: None).tree(index.get(package))
    return tree[path].data


@pytest.fixture
def guest_with_stand_in(guest_aarch64_dir: Path, tmp_path: Path) -> Path:
    stand_in = debian_file("arm64", "qemu-user", "usr/bin/qemu-x86_64")
    d = tmp_path / "guest"
    d.mkdir()
    (d / "vmlinuz").symlink_to(guest_aarch64_dir / "vmlinuz")
    cpio.append_archive(str(guest_aarch64_dir / "initrd.img"), cpio.newc_archive([
        cpio.CpioEntry("mnt", mode=0o755, directory=True),
        cpio.CpioEntry("mnt/rosetta", mode=0o755, directory=True),
        cpio.CpioEntry("mnt/rosetta/rosetta", data=stand_in, mode=0o755),
    ]), str(d / "initrd.img"))
    return d


def test_x86_64_binaries_run_in_the_aarch64_guest_through_the_registered_interpreter(
        guest_with_stand_in: Path) -> None:
    x86_busybox = debian_file("amd64", "busybox-static", "usr/bin/busybox")
    assert x86_busybox[:4] == b"\x7fELF" and x86_busybox[18] == 0x3E  # e_machine x86_64
    with Instance(guest_dir=guest_with_stand_in, arch="aarch64", rosetta=True, memory=512) as vm:
        vm.start()
        assert vm.cli("nix-machines").stdout.split()[1] == "aarch64-linux,x86_64-linux"
        reg = vm.ssh("cat", "/proc/sys/fs/binfmt_misc/rosetta")
        assert reg.returncode == 0, reg.stderr
        lines = reg.stdout.splitlines()
        assert lines[0] == "enabled" and "interpreter /mnt/rosetta/rosetta" in lines
        assert "F" in next(x for x in lines if x.startswith("flags: "))
        # named busybox: it picks the applet from argv[0]
        script = "cat > /tmp/busybox && chmod +x /tmp/busybox && /tmp/busybox uname -m; uname -m"
        run = subprocess.run(["ssh", "-F", str(vm.ssh_config), vm.config.name, "--", script],
                             input=x86_busybox, capture_output=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stdout.decode().split() == ["x86_64", "aarch64"]  # emulated, then native
        console = (Path(vm.config.log_dir) / "console.log").read_text()
        assert "virby-guest: rosetta: x86_64 binaries run through /mnt/rosetta/rosetta" in console
