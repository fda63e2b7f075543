"""The Linux test guest (`virby guest build`) against its contract in image/README.md.

Real QEMU (TCG), booted by the qemu backend's own start (testing/direct.py): the built initrd
plus an appended cpio archive with this test's keys, SSH on a forwarded loopback port QEMU
picks, the agent on the second serial port, QMP through qemu.qmp. Every wait reads a socket (or
the process) with a deadline; no sleeps.
"""

from __future__ import annotations

import gzip
import re
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from testing.direct import READY, READY_TIMEOUT, Keys, Vm, booted, run, ssh

pytestmark = pytest.mark.e2e


def kernel_release(vmlinuz: Path) -> str:
    """The release string in a bzImage's setup header (what `uname -r` will say)."""
    with open(vmlinuz, "rb") as f:
        head = f.read(65536)
    assert head[0x202:0x206] == b"HdrS", "not a bzImage"
    offset = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    return head[offset:head.index(b"\0", offset)].split()[0].decode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.generate()


@pytest.fixture(scope="module")
def guest(guest_dir: Path, keys: Keys) -> Iterator[Vm]:
    """One booted, announced guest shared by the tests that only talk to it."""
    with booted(guest_dir, keys) as vm:
        print(f"\nguest ready {vm.wait_ready():.2f}s after qemu started")
        yield vm


def test_builder_logs_in_with_the_boot_time_keys(guest: Vm, keys: Keys, guest_dir: Path) -> None:
    with ssh(guest, keys) as client:
        user, host, release = run(client, "id -un; hostname; uname -r").split()
        assert (user, host) == ("builder", "virby-vm")
        assert release == kernel_release(guest_dir / "vmlinuz")
        assert run(client, "id -u; id -g; echo $HOME").split() == ["1000", "1000", "/home/builder"]
        perms = run(client, "stat -c '%a %u %g' ~ ~/.ssh ~/.ssh/authorized_keys").splitlines()
        assert perms[1:] == ["700 1000 1000", "600 1000 1000"]
        assert perms[0].endswith(" 1000 1000")
        assert run(client, "cat ~/.ssh/authorized_keys").encode() == keys.client_pub
        path = run(client, "echo $PATH").strip().split(":")
        assert {"/usr/bin", "/bin"} <= set(path)
    assert "virby-guest: up in " in guest.console


def test_the_image_holds_no_key_of_its_own(guest_dir: Path) -> None:
    cpio = gzip.decompress((guest_dir / "initrd.img").read_bytes())
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=cpio, capture_output=True,
                             check=True).stdout.decode().split()
    assert "usr/sbin/dropbear" in listing
    assert [n for n in listing if re.search(r"_key|authorized_keys|id_ed25519|\.ssh", n)] == []


def test_the_appended_archive_overrides_the_image(guest: Vm, keys: Keys) -> None:
    with ssh(guest, keys) as client:
        # the image has /etc/virby 0755; the keys archive says 0700 and the kernel applies it
        assert run(client, "stat -c '%a %u' /etc/virby").split() == ["700", "0"]


def test_hello_answers_ready_once_sshd_listens(guest: Vm) -> None:
    assert guest.agent.ask("hello") == READY
    assert guest.agent.ask("hello") == READY


def test_unknown_agent_commands_get_an_error(guest: Vm) -> None:
    assert guest.agent.ask("reboot please") == "virby-error unknown"
    assert guest.agent.ask("") == "virby-error unknown"
    assert guest.agent.ask("time soon") == "virby-error time"
    assert guest.agent.ask("hello") == READY  # still in step


def test_time_sets_the_guest_clock(guest: Vm, keys: Keys) -> None:
    target = 2_000_000_000  # 2033: far from any plausible host clock
    try:
        assert guest.agent.ask(f"time {target}.75") == "virby-time-ok"
        with ssh(guest, keys) as client:
            now = int(run(client, "date +%s"))
        assert target <= now < target + 120
    finally:
        assert guest.agent.ask(f"time {time.time():.3f}") == "virby-time-ok"


def test_seed_takes_host_entropy_as_hex(guest: Vm) -> None:
    """After a restore the host reseeds the guest (issue 14): hex only, one answer per line."""
    assert guest.agent.ask(f"seed {secrets.token_hex(32)}") == "virby-seed-ok"
    assert guest.agent.ask("seed not-hex") == "virby-error seed"
    assert guest.agent.ask("seed ") == "virby-error seed"
    assert guest.agent.ask("hello") == READY  # still in step


def test_password_logins_are_refused(guest: Vm) -> None:
    with socket.create_connection(("127.0.0.1", guest.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=30)
            with pytest.raises(paramiko.BadAuthenticationType) as err:
                transport.auth_none("builder")
            assert "password" not in err.value.allowed_types
            assert "publickey" in err.value.allowed_types
        finally:
            transport.close()
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    with client, pytest.raises(paramiko.AuthenticationException):
        client.connect("127.0.0.1", guest.port, username="builder", password="builder",
                       look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=30)


def test_only_the_configured_user_gets_the_key(guest: Vm, keys: Keys) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        ssh(guest, keys, user="root")


def test_a_wrong_pinned_host_key_is_detected(guest: Vm, keys: Keys) -> None:
    other = Keys.generate()
    with pytest.raises(paramiko.BadHostKeyException):
        ssh(guest, keys, host_blob=other.host_blob)


def test_noready_guest_boots_but_never_announces(guest_dir: Path, keys: Keys) -> None:
    with booted(guest_dir, keys, append="virby.noready") as vm:
        vm.wait_console("virby-guest: up in ", READY_TIMEOUT)
        # a normal guest announces well under a second after "up in"; give it 15 s
        assert not [line for line in vm.agent.lines_for(15) if line.startswith("virby-ready")]
        assert vm.agent.ask("hello") == "virby-booting"
        with socket.create_connection(("127.0.0.1", vm.port), timeout=10) as sock:
            sock.settimeout(5)
            try:
                banner = sock.recv(64)
            except (TimeoutError, ConnectionResetError):
                banner = b""
            assert not banner.startswith(b"SSH-")


def test_the_login_user_comes_from_etc_virby_user(guest_dir: Path, keys: Keys) -> None:
    with booted(guest_dir, keys, user="root") as vm:
        vm.wait_ready()
        with ssh(vm, keys, user="root") as client:
            assert run(client, "id -un; stat -c '%a %U' ~/.ssh ~/.ssh/authorized_keys").split(
                "\n")[:3] == ["root", "700 root", "600 root"]
        with pytest.raises(paramiko.AuthenticationException):
            ssh(vm, keys, user="builder")


def test_power_button_powers_off(guest_dir: Path, keys: Keys) -> None:
    with booted(guest_dir, keys) as vm:
        vm.wait_ready()
        vm.qmp("system_powerdown")
        assert vm.wait_exit(60) == 0
        assert "virby-guest: shutting down" in vm.console


def test_nix_guest_serves_a_multi_user_store(guest_nix_dir: Path, keys: Keys) -> None:
    """root's nix-daemon owns the store (issue 18); the login user's Nix goes through it."""
    with booted(guest_nix_dir, keys, memory=512) as vm:
        print(f"\nnix guest ready {vm.wait_ready():.2f}s after qemu started")
        with ssh(vm, keys) as client:
            assert run(client, "nix --version").startswith("nix (Nix) ")
            assert run(client, "nix-store --version").startswith("nix-store (Nix) ")
            assert run(client, "stat -c %U:%G /nix/store; test -w /nix/store || echo ro").split() == [
                "root:nixbld", "ro"]
            added = run(client, "echo hi > /tmp/f && nix-store --add /tmp/f").strip()
            assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-f", added)
            assert run(client, f"cat {added}") == "hi\n"
            # what ssh-ng:// and ssh:// run: both answer their protocol's handshake
            assert daemon_handshake(client, "nix-daemon --stdio",
                                    struct.pack("<Q", 0x6E697863)) == 0x6478696F
            assert daemon_handshake(client, "nix-store --serve --write",
                                    struct.pack("<QQ", 0x390C9DEB, 0x206)) == 0x5452EECB


def daemon_handshake(client: paramiko.SSHClient, command: str, hello: bytes) -> int:
    """Start `command`, send the client's magic, return the server's first 64-bit word."""
    stdin, stdout, _ = client.exec_command(command, timeout=60)
    try:
        stdin.write(hello)
        stdin.flush()
        return int(struct.unpack("<Q", stdout.read(8))[0])
    finally:
        stdout.channel.close()
