"""A guest booted directly, with no Virby around it: QEMU started by the qemu backend's own
start (workers/backends/qemu/launch.py: its argv, its own session, the SSH port from
`info usernet`), for the e2e image tests, the cold bench's limit and image/boot-guest.py.

`Keys` makes a throwaway client and host key and the cpio archive that carries them into the
guest; `booted` appends that archive to an image's initrd where the backend puts its keyed
initrd, and boots; `running` boots a backend whose keyed initrd is already in place. Every wait
reads a socket or the process with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from virby.core.config import from_dict
from virby.core.cpio import CpioEntry, append_archive, newc_archive
from virby.core.keys import KeyPaths, dropbear_private
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.qemu import QemuBackend, launch

# A boot takes about 4 s alone under TCG, 12 s with 4 VMs on 2 cores
READY_TIMEOUT = 60.0
# The agent's announcement carries the guest's address (the host dials it there under vfkit):
# QEMU's user network gives the static 10.0.2.15.
READY = "virby-ready 10.0.2.15"


@dataclass(frozen=True)
class Keys:
    client_pem: str  # OpenSSH private key the client logs in with
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
    backend: QemuBackend
    runner: asyncio.Runner  # the loop that started QEMU and holds its QMP connection
    control: launch.Control
    agent: Agent
    started: float  # time.monotonic() when QEMU was started

    @property
    def port(self) -> int:
        return self.control.port

    @property
    def console(self) -> str:
        return Path(self.backend.console_log).read_text(errors="replace")

    def qemu_log(self) -> str:
        return Path(self.backend.qemu_log).read_text(errors="replace")

    def qmp(self, command: str, **arguments: Any) -> Any:
        return self.runner.run(self.control.qmp.execute(command, arguments or None))

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it still runs after `timeout` seconds."""
        child = self.backend.process.child
        assert child is not None
        try:
            return self.runner.run(asyncio.wait_for(child.wait(), timeout))
        except TimeoutError:
            return None

    def wait_console(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the console in {timeout}s:\n{self.console}")
            # the pause between looks at the file
            if (status := self.wait_exit(0.1)) is not None:
                raise AssertionError(f"qemu exited ({status}): {self.qemu_log()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait for the agent's announcement; return seconds since QEMU started."""
        self.agent.expect(READY, timeout)
        return time.monotonic() - self.started


@contextlib.contextmanager
def running(backend: QemuBackend) -> Iterator[Vm]:
    """QEMU started with the backend's argv (its disk and keyed initrd in place), the agent's
    socket connected; QEMU killed at the end."""
    with asyncio.Runner() as runner:
        started = time.monotonic()
        try:
            control = runner.run(launch.start(backend))
        except BaseException:
            runner.run(backend.process.kill())
            raise
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(backend.agent_path)  # it exists: launch waits for it
            yield Vm(backend, runner, control, Agent(sock), started)
        finally:
            sock.close()
            with contextlib.suppress(Exception):
                runner.run(control.qmp.disconnect())
            runner.run(backend.process.kill())
            backend.process.forget()


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
    """The image booted with `keys` (and `user` as the login user) in a fresh temp dir."""
    # unix socket paths must stay under 108 bytes: a short dir right under /tmp
    run = Path(tempfile.mkdtemp(dir="/tmp", prefix="vby-"))
    try:
        backend = guest_backend(image, run, memory=memory, append=append, arch=arch)
        os.makedirs(backend.config.log_dir)
        ensure_disk(backend.config.state("disk.raw"), backend.config.diskSize)  # in the argv
        # These keys in the appended archive, where the backend puts its keyed initrd.
        append_archive(str(image / "initrd.img"), keys.archive(user), backend.boot_initrd)
        with running(backend) as vm:
            yield vm
    finally:
        shutil.rmtree(run, ignore_errors=True)


def ssh(vm: Vm, keys: Keys, user: str = "builder", *,
        host_blob: bytes | None = None) -> paramiko.SSHClient:
    """A paramiko client logged in to the guest, its host key pinned."""
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
    """`command`'s stdout; asserts it exited 0."""
    _, stdout, stderr = client.exec_command(command, timeout=60)
    out = stdout.read().decode()
    status = stdout.channel.recv_exit_status()
    assert status == 0, f"{command!r} exited {status}: {stderr.read().decode()}"
    return out
