"""The Linux test guest (`virby guest build`) against its contract in image/README.md.

Real QEMU (TCG), booted with the vm worker's own command line (`QemuBackend.command()`): the
built initrd plus an appended cpio archive with this test's keys, SSH on a forwarded loopback
port QEMU picks, the agent on the second serial port, QMP through qemu.qmp. Every wait reads a
socket (or the process) with a deadline; no sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testing.harness import qmp_execute
from virby.core.config import from_dict
from virby.core.cpio import CpioEntry, append_archive, newc_archive
from virby.core.keys import KeyPaths, dropbear_private
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.qemu import QemuBackend

pytestmark = pytest.mark.e2e

# A boot takes about 4 s alone under TCG, 12 s with 4 VMs on 2 cores
READY_TIMEOUT = 60.0
USERNET_RE = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b")


@dataclass(frozen=True)
class Keys:
    client_pem: str  # OpenSSH private key the test logs in with
    client_pub: bytes  # its authorized_keys line
    host_dropbear: bytes  # the guest's host key, dropbear format
    host_blob: bytes  # the guest's public host key, SSH wire format (what we pin)

    @classmethod
    def generate(cls) -> Keys:
        client, host = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        pem = client.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                   ser.NoEncryption()).decode()
        pub = client.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
        host_line = host.public_key().public_bytes(ser.Encoding.OpenSSH,
                                                   ser.PublicFormat.OpenSSH)
        return cls(pem, pub + b" virby-test\n", dropbear_private(host),
                   base64.b64decode(host_line.split()[1]))

    def archive(self, user: str = "builder") -> bytes:
        return newc_archive([
            CpioEntry("etc/virby", mode=0o700, directory=True),
            CpioEntry("etc/virby/ssh_host_ed25519_key", data=self.host_dropbear, mode=0o600),
            CpioEntry("etc/virby/authorized_keys", data=self.client_pub, mode=0o644),
            CpioEntry("etc/virby/user", data=user.encode() + b"\n", mode=0o644),
        ])


# The agent's announcement carries the guest's address (the host dials it there under vfkit):
# QEMU's user network gives the static 10.0.2.15.
READY = "virby-ready 10.0.2.15"


class Agent:
    """The host end of the guest agent's line protocol (a QEMU socket chardev)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def readline(self, timeout: float) -> str | None:
        """The next line, or None if none is complete within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return None
            if not chunk:
                raise AssertionError(f"agent socket closed; unfinished line {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def lines_for(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        seen = []
        while (line := self.readline(deadline - time.monotonic())) is not None:
            seen.append(line)
        return seen

    def expect(self, wanted: str, timeout: float) -> list[str]:
        """Read until the line `wanted`; return the lines before it."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (line := self.readline(deadline - time.monotonic())) != wanted:
            if line is None:
                raise AssertionError(f"no {wanted!r} from the agent in {timeout}s; got {seen}")
            seen.append(line)
        return seen

    def ask(self, line: str, timeout: float = 10.0) -> str:
        self.send(line)
        reply = self.readline(timeout)
        assert reply is not None, f"no reply to {line!r} within {timeout}s"
        return reply


@dataclass
class Vm:
    dir: Path
    backend: QemuBackend
    proc: subprocess.Popen[bytes]
    agent: Agent
    port: int
    started: float  # time.monotonic() when QEMU was started

    @property
    def console(self) -> str:
        return Path(self.backend.console_log).read_text(errors="replace")

    def qmp(self, command: str, **arguments: Any) -> Any:
        return qmp_execute(self.backend.qmp_path, command, arguments or None)

    def qemu_log(self) -> str:
        return (self.dir / "qemu.log").read_text(errors="replace")

    def wait_console(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the console in {timeout}s:\n{self.console}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.1)  # the pause between looks at the file
                raise AssertionError(f"qemu exited ({self.proc.returncode}): {self.qemu_log()}")

    def wait_ready(self) -> float:
        """Wait for the agent's announcement; return seconds since QEMU started."""
        self.agent.expect(READY, READY_TIMEOUT)
        return time.monotonic() - self.started


def connect_unix(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> socket.socket:
    """Connect to a socket QEMU creates once it has parsed its command line."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"qemu created no {path.name} within {timeout}s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.01)
            log = (path.parent / "qemu.log").read_text(errors="replace")
            raise AssertionError(f"qemu exited ({proc.returncode}): {log}")


def guest_backend(image: Path, run: Path, *, memory: int, append: str,
                  arch: str = "x86_64") -> QemuBackend:
    """The qemu backend for a guest image, with state and sockets in `run` (TCG, one core)."""
    console = "ttyAMA0" if arch == "aarch64" else "ttyS0"
    config = from_dict({
        "stateDir": str(run / "state"), "runtimeDir": str(run), "accel": "tcg", "memory": memory,
        "diskSize": "1GiB", "arch": arch,
        "guest": {"kernel": str(image / "vmlinuz"), "initrd": str(image / "initrd.img"),
                  "cmdline": f"console={console} quiet panic=-1 {append}".strip()},
    }, source=None)
    return QemuBackend(config, KeyPaths.in_dir(config.stateDir))


@contextlib.contextmanager
def booted(image: Path, keys: Keys, *, memory: int = 256, append: str = "",
           user: str = "builder", arch: str = "x86_64") -> Iterator[Vm]:
    # unix socket paths must stay under 108 bytes: a short dir right under /tmp
    run = Path(tempfile.mkdtemp(dir="/tmp", prefix="vby-"))
    try:
        backend = guest_backend(image, run, memory=memory, append=append, arch=arch)
        os.makedirs(backend.config.log_dir)
        ensure_disk(backend.config.state("disk.raw"), backend.config.diskSize)  # what _start does
        # This test's own keys in the appended archive, where the backend puts its keyed initrd.
        append_archive(str(image / "initrd.img"), keys.archive(user), backend.boot_initrd)
        with open(run / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(backend.command(), stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=qlog)
        started = time.monotonic()
        try:
            agent = Agent(connect_unix(Path(backend.agent_path), proc))
            usernet = qmp_execute(backend.qmp_path, "human-monitor-command",
                                  {"command-line": "info usernet"})
            m = USERNET_RE.search(usernet)
            assert m, f"no SSH forward in `info usernet`:\n{usernet}"
            yield Vm(run, backend, proc, agent, int(m.group(1)), started)
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def ssh(vm: Vm, keys: Keys, user: str = "builder", *,
        host_blob: bytes | None = None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pinned = paramiko.Ed25519Key(data=host_blob or keys.host_blob)
    client.get_host_keys().add(f"[127.0.0.1]:{vm.port}", "ssh-ed25519", pinned)
    try:
        client.connect("127.0.0.1", vm.port, username=user,
                       pkey=paramiko.Ed25519Key.from_private_key(io.StringIO(keys.client_pem)),
                       look_for_keys=False, allow_agent=False,
                       timeout=10, banner_timeout=30, auth_timeout=30)
    except BaseException:
        client.close()
        raise
    return client


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=60)
    out = stdout.read().decode()
    status = stdout.channel.recv_exit_status()
    assert status == 0, f"{command!r} exited {status}: {stderr.read().decode()}"
    return out


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
        assert vm.proc.wait(timeout=60) == 0
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
