"""The vfkit command line and the files it names, against vfkit's documented flags
(doc/usage.md of crc-org/vfkit: `--bootloader linux,...`, `--device ...`, `--restful-uri`)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from virby.core import cpio, machost
from virby.core.config import from_dict
from virby.core.keys import ensure_keys, guest_keys_archive
from virby.workers.backends.base import BackendError
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.vfkit import backend as vfkit_mod
from virby.workers.backends.vfkit.backend import VfkitBackend, nested_supported
from virby.workers.backends.vfkit.provision import ensure_mac

GiB = 1 << 30
ARM64_IMAGE = b"MZ" + bytes(54) + b"ARM\x64" + bytes(8)  # the arm64 Image header's magic at 56
REAL_CPU_BRAND = vfkit_mod.cpu_brand  # before any test replaces it


@pytest.fixture(autouse=True)
def not_a_mac(monkeypatch):
    """Tests choose the CPU and the macOS version; nothing asks the real machine."""
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: None)
    monkeypatch.setattr(vfkit_mod, "macos_version", lambda: None)


@pytest.fixture
def setup(tmp_path: Path):
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "Image").write_bytes(ARM64_IMAGE)
    (guest / "initrd").write_bytes(b"070701")
    keys = ensure_keys(str(tmp_path / "state"))
    vfkit = tmp_path / "bin" / "vfkit"
    vfkit.parent.mkdir()
    vfkit.write_text("#!/bin/sh\n")
    vfkit.chmod(0o755)

    def make(**extra) -> VfkitBackend:
        guest_cfg = {"kernel": str(guest / "Image"), "initrd": str(guest / "initrd"),
                     "cmdline": "console=hvc0 init=/nix/store/x-nixos/init loglevel=4"}
        guest_cfg.update(extra.pop("guest", {}))
        data = {"backend": "vfkit", "hypervisor": str(vfkit), "cores": 4, "memory": "6GiB",
                "diskSize": "20GiB", "stateDir": str(tmp_path / "state"),
                "runtimeDir": str(tmp_path / "run"), "guest": guest_cfg, **extra}
        return VfkitBackend(from_dict(data), keys)

    make.tmp = tmp_path  # type: ignore[attr-defined]
    return make


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]


def test_default_command_line(setup) -> None:
    b = setup()
    t = setup.tmp
    mac = b.mac
    assert b.command() == [
        str(t / "bin/vfkit"),
        "--cpus", "4",
        "--memory", "6144",
        "--bootloader",
        f"linux,kernel={t}/guest/Image,initrd={t}/run/initrd.img,"
        'cmdline="console=hvc0 init=/nix/store/x-nixos/init loglevel=4"',
        "--device", f"virtio-blk,path={t}/state/disk.raw",
        "--device", f"virtio-net,nat,mac={mac}",
        # hvc0: the console; hvc1: the guest agent, on a pty vfkit reports in /vm/inspect
        "--device", f"virtio-serial,logFilePath={t}/state/logs/console.log",
        "--device", "virtio-serial,pty",
        "--device", "virtio-rng",
        "--device", "virtio-balloon",
        "--restful-uri", f"unix://{t}/run/vfkit.rest",
    ]


def test_the_locks_aarch64_guest_command_line(setup) -> None:
    """The Mac's default guest (nix/guest.nix, what the nix-darwin module writes): the Debian
    guest's uncompressed Image, console=hvc0, no store image (the store is on the data disk),
    NAT networking, and the Rosetta device when enabled."""
    b = setup(rosetta=True, guest={"cmdline": "console=hvc0 panic=-1"})
    t = setup.tmp
    argv = b.command()
    assert argv[argv.index("--bootloader") + 1] == (
        f'linux,kernel={t}/guest/Image,initrd={t}/run/initrd.img,cmdline="console=hvc0 panic=-1"')
    dev = devices(argv)
    assert [d for d in dev if d.startswith("virtio-blk,")] == [f"virtio-blk,path={t}/state/disk.raw"]
    assert f"virtio-net,nat,mac={b.mac}" in dev
    assert "rosetta,mountTag=rosetta" in dev


def test_boot_initrd_is_the_guests_with_the_keys_cpio_appended(setup) -> None:
    b = setup()
    b.prepare()
    # what boot() runs (off the event loop there)
    cpio.append_archive(b.config.guest.initrd, guest_keys_archive(b.keys, "builder"), b.boot_initrd)
    data = Path(b.boot_initrd).read_bytes()
    assert data.startswith(b"070701")  # the guest's own initrd first
    assert b"etc/virby/authorized_keys" in data and b"etc/virby/ssh_host_ed25519_key" in data
    assert Path(b.keys.client_pub).read_bytes() in data
    assert stat.S_IMODE(os.stat(b.boot_initrd).st_mode) == 0o600  # it holds the host key


def test_rest_api_is_only_ever_a_unix_socket(setup) -> None:
    for extra in ({}, {"debug": True}, {"rosetta": True}, {"port": 40000}):
        argv = setup(**extra).command()
        uri = argv[argv.index("--restful-uri") + 1]
        assert uri.startswith("unix:///")
        assert not any(a.startswith("tcp://") for a in argv)


def test_rosetta_device_only_when_enabled(setup) -> None:
    assert "rosetta,mountTag=rosetta" not in devices(setup().command())
    assert "rosetta,mountTag=rosetta" in devices(setup(rosetta=True).command())


def test_shared_directories_one_virtiofs_each_by_tag(setup, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "cache").mkdir()
    b = setup(sharedDirectories={"src": str(tmp_path / "src"), "cache": str(tmp_path / "cache")})
    fs = [d for d in devices(b.command()) if d.startswith("virtio-fs,")]
    assert fs == [
        f"virtio-fs,sharedDir={tmp_path}/cache,mountTag=cache",
        f"virtio-fs,sharedDir={tmp_path}/src,mountTag=src",
    ]


def test_the_key_share_only_for_a_guest_that_reads_it(setup, tmp_path: Path) -> None:
    """The Debian guest takes its keys from its initrd; the NixOS guest (a store image) from
    the virby-keys share. No share nobody reads, and no keys in it."""
    key_share = f"virtio-fs,sharedDir={tmp_path}/state/guest-keys,mountTag=virby-keys"
    debian = setup()
    debian.prepare()
    assert key_share not in devices(debian.command())
    assert not os.path.exists(debian.guest_keys_dir)
    (tmp_path / "store.img").write_bytes(b"\0" * 512)
    nixos = setup(guest={"disk": str(tmp_path / "store.img")})
    assert key_share in devices(nixos.command())


def test_no_vsock_and_no_named_port(setup) -> None:
    """One transport for the agent, the one the guest looks for: an unnamed virtio console."""
    dev = devices(setup().command())
    assert not any(d.startswith("virtio-vsock") for d in dev)
    assert [d for d in dev if d.startswith("virtio-serial")][1] == "virtio-serial,pty"


def test_store_image_is_a_second_read_only_disk(setup, tmp_path: Path) -> None:
    (tmp_path / "store.img").write_bytes(b"\0" * 512)
    b = setup(guest={"disk": str(tmp_path / "store.img")})
    blk = [d for d in devices(b.command()) if d.startswith("virtio-blk,")]
    # The data disk first: it is /dev/vda in the guest, the store image /dev/vdb.
    assert blk == [f"virtio-blk,path={tmp_path}/state/disk.raw",
                   f"virtio-blk,path={tmp_path}/store.img,readonly"]


def test_debug_raises_vfkits_log_level(setup) -> None:
    assert "--log-level" not in setup().command()
    argv = setup(debug=True).command()
    assert argv[argv.index("--log-level") + 1] == "debug"


@pytest.mark.parametrize(("brand", "flag"), [
    (None, True),  # not asked (not a Mac): leave it to vfkit
    ("Apple M3 Pro", True),
    ("Apple M4", True),
    ("Apple M1", False),
    ("Apple M2 Max", False),
])
def test_nested_virtualization_flag(setup, monkeypatch, brand, flag) -> None:
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: brand)
    assert ("--nested" in setup(nestedVirtualization=True).command()) is flag
    assert "--nested" not in setup().command()


def test_nested_on_m1_warns_at_check(setup, monkeypatch, caplog) -> None:
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: "Apple M1 Pro")
    with caplog.at_level(logging.WARNING):
        setup(nestedVirtualization=True).check()
    assert "Apple M1 Pro cannot run nested VMs" in caplog.text


def test_nested_supported_reads_brand_names() -> None:
    assert nested_supported("Apple M3 Max")
    assert not nested_supported("Apple M2 Ultra")
    assert nested_supported("Apple M10")  # not M1


@pytest.mark.parametrize(("macos", "flag"), [
    (None, True),  # not known: leave it to vfkit
    ((14, 7), False),  # vfkit: "nested virtualization is not supported"
    ((15, 0), True),
    ((26, 1), True),
])
def test_nested_flag_needs_macos_15(setup, monkeypatch, macos, flag) -> None:
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: "Apple M4 Pro")
    monkeypatch.setattr(vfkit_mod, "macos_version", lambda: macos)
    assert ("--nested" in setup(nestedVirtualization=True).command()) is flag
    assert nested_supported("Apple M4 Pro", macos) is flag


def test_nested_on_macos_14_warns_at_check(setup, monkeypatch, caplog) -> None:
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: "Apple M3")
    monkeypatch.setattr(vfkit_mod, "macos_version", lambda: (14, 6))
    with caplog.at_level(logging.WARNING):
        setup(nestedVirtualization=True).check()
    assert ("nestedVirtualization is on, but nested virtualization needs macOS 15 or later "
            "(this Mac runs macOS 14.6); starting without it") in caplog.text


@pytest.fixture
def a_mac(monkeypatch, tmp_path: Path) -> Path:
    """An Apple silicon Mac on macOS 15 whose filesystem root is a temp dir (no Rosetta yet)."""
    root = tmp_path / "mac-root"
    root.mkdir()
    monkeypatch.setattr(machost.sys, "platform", "darwin")
    monkeypatch.setattr(machost, "host_machine", lambda: "arm64")
    monkeypatch.setattr(machost, "host_macos_version", lambda: (15, 2))
    monkeypatch.setattr(machost, "ROOT", str(root))
    return root


def test_check_refuses_rosetta_when_it_is_not_installed(setup, a_mac: Path) -> None:
    b = setup(rosetta=True)
    with pytest.raises(BackendError) as e:
        b.check()
    assert "Rosetta is not installed on this Mac" in str(e.value)
    assert "softwareupdate --install-rosetta --agree-to-license" in str(e.value)
    runtime = a_mac / machost.ROSETTA_RUNTIME
    runtime.parent.mkdir(parents=True)
    runtime.write_bytes(b"\xcf\xfa\xed\xfe")
    b.check()  # installed: nothing to say
    setup(rosetta=False).check()


def test_check_ignores_missing_rosetta_when_rosetta_is_off(setup, a_mac: Path) -> None:
    setup().check()


def test_cpu_brand_asks_nothing_off_macos(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("sysctl must not run off macOS")

    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(machost.sys, "platform", "linux")
    REAL_CPU_BRAND.cache_clear()
    try:
        assert REAL_CPU_BRAND() is None
    finally:
        REAL_CPU_BRAND.cache_clear()


def test_cpu_brand_reads_sysctl_on_macos(monkeypatch) -> None:
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="Apple M2 Pro\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(machost.sys, "platform", "darwin")
    REAL_CPU_BRAND.cache_clear()
    try:
        assert REAL_CPU_BRAND() == "Apple M2 Pro"
        assert REAL_CPU_BRAND() == "Apple M2 Pro"
    finally:
        REAL_CPU_BRAND.cache_clear()
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]  # asked once, then cached


# -- MAC -----------------------------------------------------------------------------------------


def test_mac_is_locally_administered_unicast_and_stable(tmp_path: Path) -> None:
    path = str(tmp_path / "mac")
    mac = ensure_mac(path)
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01
    assert len(mac.split(":")) == 6
    assert ensure_mac(path) == mac
    assert Path(path).read_text() == mac + "\n"


def test_mac_survives_new_backends(setup) -> None:
    assert setup().mac == setup(rosetta=True).mac


def test_garbage_mac_file_is_replaced_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "mac"
    path.write_text("01:00:5e:00:00:01\n")  # multicast: not usable
    with caplog.at_level(logging.WARNING):
        mac = ensure_mac(str(path))
    assert mac != "01:00:5e:00:00:01"
    assert "not a locally administered MAC" in caplog.text


# -- data disk -----------------------------------------------------------------------------------


def test_disk_is_created_sparse_and_rounded_to_whole_mib(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.raw")
    assert ensure_disk(path, GiB + 1) == GiB + (1 << 20)
    st = os.stat(path)
    assert st.st_size == GiB + (1 << 20)
    assert st.st_blocks * 512 < 1 << 20  # no blocks written
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_disk_grows_in_place_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    ensure_disk(str(path), GiB)
    with open(path, "r+b") as f:
        f.write(b"ext4 superblock stand-in")
    assert ensure_disk(str(path), 2 * GiB) == 2 * GiB
    assert path.stat().st_size == 2 * GiB
    with open(path, "rb") as f:
        assert f.read(24) == b"ext4 superblock stand-in"


def test_disk_is_never_shrunk(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    ensure_disk(str(path), 2 * GiB)
    with pytest.raises(BackendError, match="never shrunk"):
        ensure_disk(str(path), GiB)
    assert path.stat().st_size == 2 * GiB


# -- prepare and check ---------------------------------------------------------------------------


def test_prepare_fills_the_guest_key_share(setup, tmp_path: Path) -> None:
    (tmp_path / "store.img").write_bytes(b"\0" * 512)
    b = setup(sshUser="nixbuilder", guest={"disk": str(tmp_path / "store.img")})
    os.makedirs(b.config.runtimeDir)
    Path(b.rest_socket).write_text("stale")
    b.prepare()
    share = Path(b.guest_keys_dir)
    assert sorted(os.listdir(share)) == ["authorized_keys", "shares", "ssh_host_ed25519_key",
                                         "user"]
    assert (share / "shares").read_text() == ""
    assert (share / "ssh_host_ed25519_key").read_bytes() == Path(b.keys.host_key).read_bytes()
    assert (share / "authorized_keys").read_bytes() == Path(b.keys.client_pub).read_bytes()
    assert (share / "user").read_text() == "nixbuilder\n"
    assert stat.S_IMODE(share.stat().st_mode) == 0o700
    for f in share.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert os.path.getsize(b.disk_path) == 20 * GiB
    assert not os.path.exists(b.rest_socket)  # vfkit could not bind over a stale one


def test_guest_settings_follow_the_config_without_an_image_change(setup, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "store.img").write_bytes(b"\0" * 512)
    nixos = {"disk": str(tmp_path / "store.img")}
    on = setup(rosetta=True, guest=nixos, sharedDirectories={"src": str(tmp_path / "src"),
                                                             "cache": str(tmp_path / "cache")})
    on.prepare()
    share = Path(on.guest_keys_dir)
    assert (share / "shares").read_text() == "cache\nsrc\n"
    assert (share / "rosetta").exists()
    off = setup(guest=nixos)
    off.prepare()
    assert (share / "shares").read_text() == ""
    assert not (share / "rosetta").exists()


def test_check_passes_for_a_complete_setup(setup) -> None:
    setup().check()


def test_check_names_a_missing_kernel(setup, tmp_path: Path) -> None:
    b = setup(guest={"kernel": str(tmp_path / "nope")})
    with pytest.raises(BackendError, match=r"guest kernel not found: .*/nope"):
        b.check()


def test_check_refuses_a_compressed_kernel(setup, tmp_path: Path) -> None:
    (tmp_path / "Image.gz").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(BackendError, match="gzip-compressed"):
        setup(guest={"kernel": str(tmp_path / "Image.gz")}).check()


def test_check_refuses_a_kernel_that_is_not_an_arm64_image(setup, tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"MZ" + bytes(0x200) + b"HdrS")  # an x86 kernel
    with pytest.raises(BackendError, match=r"not an arm64 Image: .*/bzImage"):
        setup(guest={"kernel": str(tmp_path / "bzImage")}).check()


def test_check_refuses_commas_vfkit_cannot_parse(setup, tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    with pytest.raises(BackendError, match="shared directory x path contains a comma"):
        setup(sharedDirectories={"x": str(odd)}).check()


def test_check_refuses_quotes_in_the_cmdline(setup) -> None:
    with pytest.raises(BackendError, match="must not contain"):
        setup(guest={"cmdline": 'console=hvc0 foo="bar"'}).check()


def test_check_names_a_missing_shared_directory(setup, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"shared directory src is not a directory"):
        setup(sharedDirectories={"src": str(tmp_path / "gone")}).check()


def test_check_names_a_missing_vfkit(setup) -> None:
    with pytest.raises(BackendError, match="vfkit not found: vfkit-missing"):
        setup(hypervisor="vfkit-missing").check()
