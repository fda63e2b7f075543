"""The QEMU command line and the checks made before a boot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virby.core.config import from_dict
from virby.core.keys import ensure_keys
from virby.workers.backends.base import BackendError
from virby.workers.backends.qemu.backend import QemuBackend


def backend(tmp_path: Path, **over: object) -> QemuBackend:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    data = {"runtimeDir": str(tmp_path / "r"), "stateDir": str(tmp_path / "s"), "accel": "tcg",
            "guest": {"kernel": str(tmp_path / "vmlinuz"), "initrd": str(tmp_path / "initrd.img")},
            **over}
    c = from_dict(data)
    return QemuBackend(c, ensure_keys(c.stateDir))


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line(tmp_path: Path) -> None:
    b = backend(tmp_path, cores=2, memory="1GiB")
    argv = b.command()
    assert argv[0] == "qemu-system-x86_64"
    assert arg_after(argv, "-accel") == ["tcg,tb-size=128"]
    assert arg_after(argv, "-m") == ["1024"] and arg_after(argv, "-smp") == ["2"]
    assert arg_after(argv, "-M") == ["q35"]
    assert arg_after(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert arg_after(argv, "-initrd") == [str(tmp_path / "r" / "initrd.img")]  # base + keys
    assert arg_after(argv, "-append") == ["console=ttyS0 quiet panic=-1"]
    # user networking (the guest reaches the network: substitutes, fixed-output fetches), sshd
    # forwarded to a loopback port QEMU picks
    assert arg_after(argv, "-netdev") == ["user,id=n0,hostfwd=tcp:127.0.0.1:0-:22"]
    assert arg_after(argv, "-qmp") == [f"unix:{tmp_path}/r/qmp.sock,server=on,wait=off"]
    assert f"socket,id=agent,path={tmp_path}/r/agent.sock,server=on,wait=off" in arg_after(argv, "-chardev")
    # the console on the first serial port; the agent on an unnamed virtio console (hvc0)
    assert arg_after(argv, "-serial") == ["chardev:console"]
    assert arg_after(argv, "-device")[-2:] == ["virtio-serial-pci,id=vser0",
                                               "virtconsole,chardev=agent,bus=vser0.0"]
    assert "-daemonize" not in argv  # QEMU stays our child
    assert "-cpu" not in argv


def test_aarch64_command_line(tmp_path: Path) -> None:
    argv = backend(tmp_path, arch="aarch64").command()
    assert argv[0] == "qemu-system-aarch64"
    assert arg_after(argv, "-M") == ["virt"]
    assert arg_after(argv, "-accel") == ["tcg,tb-size=128"]
    assert arg_after(argv, "-cpu") == ["cortex-a72"]  # not max: its pointer auth is slow in TCG
    assert arg_after(argv, "-append") == ["console=ttyAMA0 quiet panic=-1"]
    # virt has one PL011: the console; the agent is an unnamed virtio console, as on q35
    assert arg_after(argv, "-serial") == ["chardev:console"]
    assert arg_after(argv, "-device") == ["virtio-net-pci,netdev=n0,romfile=", "virtio-rng-pci",
                                          "virtio-serial-pci,id=vser0",
                                          "virtconsole,chardev=agent,bus=vser0.0"]


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_vfkit_layout_gives_the_guest_what_vfkit_gives(tmp_path: Path, arch: str) -> None:
    argv = backend(tmp_path, arch=arch, qemuDevices="vfkit").command()
    # vfkit's default command line: console on the first virtio console, DHCP from the NAT
    assert arg_after(argv, "-append") == ["console=hvc0 quiet panic=-1 virby.net=dhcp"]
    assert "-serial" not in argv  # no serial port: the console and the agent are virtio consoles
    assert arg_after(argv, "-chardev") == [
        f"file,id=console,path={tmp_path}/s/logs/console.log,append=on",
        "pty,id=agent"]  # vfkit's virtio-serial,pty: a host pty, no name in the guest
    devices = arg_after(argv, "-device")
    assert devices == ["virtio-net-pci,netdev=n0,romfile=", "virtio-rng-pci", "virtio-balloon-pci",
                       "virtio-serial-pci,id=vser0", "virtconsole,chardev=console,bus=vser0.0",
                       "virtconsole,chardev=agent,bus=vser0.0"]
    assert not any("virtserialport" in d or "name=" in d for d in devices)  # vfkit can't name ports
    assert not any("vmgenid" in d for d in devices)  # vfkit has none


def test_vfkit_layout_is_qemus_choice_only(tmp_path: Path) -> None:
    from virby.core.config import ConfigError
    with pytest.raises(ConfigError, match="config key 'qemuDevices'"):
        backend(tmp_path, qemuDevices="vz")
    with pytest.raises(ConfigError, match=r"config key 'qemuDevices'.*vfkit backend"):
        from_dict({"backend": "vfkit", "qemuDevices": "vfkit"})


@pytest.mark.parametrize(("host", "arch", "platform", "accel"), [
    ("arm64", "aarch64", "darwin", "hvf"),  # Apple Silicon
    ("x86_64", "aarch64", "darwin", "tcg"),  # an Intel Mac cannot run an arm64 guest in HVF
    ("aarch64", "x86_64", "linux", "tcg"),
    ("x86_64", "aarch64", "linux", "tcg"),
])
def test_auto_accel_only_for_the_hosts_own_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                host: str, arch: str, platform: str, accel: str) -> None:
    from virby.core import config as cfg
    from virby.workers.backends.qemu import accel as qemu

    b = backend(tmp_path, accel="auto", arch=arch)
    monkeypatch.setattr(cfg.os, "uname", lambda: os.uname_result(("X", "h", "6", "#1", host)))
    monkeypatch.setattr(qemu.sys, "platform", platform)
    assert b.accel() == accel
    argv = b.command()
    assert arg_after(argv, "-cpu") == (["host"] if accel == "hvf" else
                                       ["cortex-a72"] if arch == "aarch64" else [])


def test_shared_directories_and_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    b = backend(tmp_path, sharedDirectories={"src": "/srv/src"}, memory=768, guest={"disk": str(disk)})
    argv = b.command()
    # virtio-fs, as vfkit gives shares (the guest kernel has no 9p): virtiofsd on a socket,
    # with the guest's memory shared with it
    assert f"socket,id=fs0,path={tmp_path}/r/fs-src.sock" in arg_after(argv, "-chardev")
    assert "vhost-user-fs-pci,chardev=fs0,tag=src" in arg_after(argv, "-device")
    assert arg_after(argv, "-object") == ["memory-backend-memfd,id=mem,size=768M,share=on"]
    assert arg_after(argv, "-machine") == ["memory-backend=mem"]
    assert "-virtfs" not in argv
    from virby.workers.backends.qemu import virtiofs
    assert virtiofs.command("/usr/lib/qemu/virtiofsd", b.config, "src") == [
        "/usr/lib/qemu/virtiofsd", f"--socket-path={tmp_path}/r/fs-src.sock",
        "-o", "source=/srv/src", "-o", "cache=auto"]
    assert arg_after(argv, "-drive") == [
        f"file={tmp_path}/s/disk.raw,if=virtio,format=raw,cache=writeback",  # /dev/vda: the store
        f"file={disk},if=virtio,format=raw,cache=writeback"]


def test_accel_is_a_setting_or_a_recorded_probe_never_the_device(tmp_path: Path) -> None:
    b = backend(tmp_path, accel="auto")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert b.accel() == "tcg"
        return
    # /dev/kvm may open and still not run a guest: untested, "auto" means "probe with a boot"
    assert b.probe.recorded() is None and b.accel() == "kvm"
    b.probe.record("tcg", "no announcement")
    assert b.accel() == "tcg" and "-cpu" not in b.command()
    b.probe.record("kvm", "announced")
    assert b.accel() == "kvm" and "-cpu" in b.command()
    # a record made for another host kernel or QEMU binary does not count
    record = json.loads(Path(b.probe.path).read_text())
    Path(b.probe.path).write_text(json.dumps({**record, "key": "other"}))
    assert b.probe.recorded() is None
    assert backend(tmp_path, accel="tcg").accel() == "tcg"


@pytest.mark.parametrize(("what", "message"), [
    ("kernel", "guest kernel (guest.kernel) not found"),
    ("initrd", "guest initrd (guest.initrd) not found"),
    ("hypervisor", "hypervisor not found: /nonexistent/qemu"),
])
def test_check_names_the_missing_file(tmp_path: Path, what: str, message: str) -> None:
    b = backend(tmp_path, hypervisor="/nonexistent/qemu" if what == "hypervisor" else "qemu-system-x86_64")
    if what == "kernel":
        (tmp_path / "vmlinuz").unlink()
    if what == "initrd":
        (tmp_path / "initrd.img").unlink()
    with pytest.raises(BackendError, match=message.replace("(", r"\(").replace(")", r"\)")):
        b.check()


def test_guest_network_none_cuts_the_guest_off(tmp_path: Path) -> None:
    argv = backend(tmp_path, guestNetwork="none").command()
    assert arg_after(argv, "-netdev") == ["user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:0-:22"]
