"""A real Virby instance for tests and benchmarks: `virby run` in a temp dir on a free port.

Waiting is done on events: `wait_bus` subscribes to the state owners' XPUBs and checks each
broadcast (they arrive on every change and at least once a second), so no test sleeps for a
fixed time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from virby.core.config import Config, from_dict
from virby.supervisor import control
from virby.workers import bus

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_guest(with_nix: bool = False, arch: str = "x86_64") -> Path:
    """Build (or find up to date) the test guest with `virby guest build`, into its default
    folder in the user's cache dir (`base`, or `nix` with Nix inside); return that folder."""
    variant = "nix" if with_nix else "base"
    proc = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "guest", "build",
                           "--arch", arch, "--variant", variant],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"virby guest build failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


def guest_for(arch: str, with_nix: bool = False) -> Path:
    """The test guest for `arch` (`virby guest build --arch ARCH`)."""
    return build_guest(with_nix=with_nix, arch=arch)


def qmp_execute(path: str, command: str, arguments: dict[str, Any] | None = None, *,
                deadline: float | None = None) -> Any:
    """Run one QMP command on a QEMU unix socket with qemu.qmp's QMPClient (one connection per
    command; QEMU takes the next client once one leaves), retrying the connection until the
    socket accepts or `deadline` (monotonic, default 10 s from now). Returns its `return`."""
    import asyncio

    from qemu.qmp import QMPClient
    from qemu.qmp.error import QMPError

    end = deadline if deadline is not None else time.monotonic() + 10

    async def run() -> Any:
        while True:
            qmp = QMPClient("virby-test")
            try:
                await qmp.connect(path)
                break
            except (QMPError, OSError) as e:
                if time.monotonic() > end:
                    raise TimeoutError(f"QMP socket {path} does not accept: {e}") from None
                await asyncio.sleep(0.005)
        try:
            return await asyncio.wait_for(qmp.execute(command, arguments),
                                          max(0.1, end - time.monotonic()))
        finally:
            with contextlib.suppress(QMPError, OSError):
                await qmp.disconnect()

    return asyncio.run(run())


class Instance:
    """Owns a temp dir, a `virby run` process tree and whatever QEMU it started; `close()`
    ends them all and removes the dir."""

    def __init__(self, guest_dir: Path | None = None, **overrides: Any) -> None:
        # Short path: unix sockets must stay under 104 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))
        self.port = free_port()
        data: dict[str, Any] = {
            "port": self.port,
            "stateDir": str(self.dir / "state"),
            "runtimeDir": str(self.dir / "run"),
            "accel": "tcg",
            "readyTimeout": 60,
            "onDemand": {"pauseAfter": 600, "stopAfter": 1200},
        }
        # No guest: point at files that do not exist, so a boot fails at once and cleanly.
        gdir = guest_dir if guest_dir is not None else self.dir / "no-guest"
        data["guest"] = {"kernel": str(gdir / "vmlinuz"), "initrd": str(gdir / "initrd.img")}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        self.config_path = self.dir / "config.json"
        self.config_path.write_text(json.dumps(data))
        self.config: Config = from_dict(data, source=str(self.config_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctx = zmq.Context()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> Instance:
        log = open(self.dir / "run.out", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virby.supervisor.cli", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.wait_bus(lambda s: all_up(s), timeout, "all three watchers to be up on the bus")
        return self

    def close(self) -> None:
        qemu = self.qemu()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Anything left (a test may have orphaned it): kill by identity, never by name.
        for p in self.tree_leftovers() + ([qemu] if qemu else []):
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tree_leftovers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            with contextlib.suppress(psutil.Error):
                env = p.info.get("environ") or {}
                if env.get("VIRBY_CONFIG", "").startswith(str(self.dir)):
                    out.append(p)
        return out

    # -- inspection -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return control.status(self.config)

    def circus(self, command: str, **props: Any) -> dict[str, Any]:
        return control.circus_call(self.config, command, timeout=5, **props)

    def watcher_pid(self, name: str) -> int:
        pids = self.circus("list", name=name).get("pids") or []
        assert len(pids) == 1, f"{name} has pids {pids}"
        return int(pids[0])

    def circusd_pid(self) -> int:
        return int((self.dir / "run" / "circusd.pid").read_text())

    def qemu(self) -> psutil.Process | None:
        try:
            data = json.loads((self.dir / "run" / "qemu.pid.json").read_text())
            p = psutil.Process(int(data["pid"]))
            return p if p.status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, KeyError, psutil.Error):
            return None

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", *args,
                               "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"virby {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    @property
    def ssh_config(self) -> Path:
        path = self.dir / "ssh_config"
        if not path.exists():
            path.write_text(self.cli("ssh-config").stdout)
        return path

    def ssh_argv(self, *command: str) -> list[str]:
        """ssh through the forwarder, one connection per command: tests count connections, so
        the ssh_config's shared connection (ControlMaster) is off here."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "ControlPath=none", self.config.name,
                "--", *command]

    def ssh(self, *command: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(*command),
                              capture_output=True, text=True, timeout=timeout, check=False, **kw)

    def ssh_popen(self, *command: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.ssh_argv(*command), **kw)

    # -- waiting on the bus ---------------------------------------------------------------------

    def wait_bus(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> dict[str, Any]:
        """Wait until `predicate(states)` holds, where states maps "vm"/"idle" to the latest
        broadcast (each with its `inc`). Raises AssertionError naming `what` on timeout."""
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        for owner in bus.XPUB_OWNERS:
            sock.setsockopt(zmq.SUBSCRIBE, owner.encode())
            sock.connect(self.config.endpoint(f"{owner}.pub"))
        states: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while True:
                if states and predicate(states):
                    return states
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: "
                                         f"{json.dumps(states, default=str)[:1500]}")
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"virby run exited ({self.proc.returncode}) while waiting for "
                                         f"{what}: {(self.dir / 'run.out').read_text()[-2000:]}")
                if sock.poll(int(min(remaining, 0.5) * 1000)):
                    try:
                        msg = bus.decode(sock.recv_multipart())
                    except bus.BadMessage:
                        continue
                    if msg.kind == "state":
                        states[msg.sender] = {**msg.data, "inc": msg.inc}
        finally:
            sock.close(linger=0)

    def wait_vm(self, *states: str, timeout: float = 90) -> dict[str, Any]:
        return self.wait_bus(lambda s: s.get("vm", {}).get("state") in states, timeout,
                             f"the VM to be {'/'.join(states)}")["vm"]

    def wait_log(self, watcher: str, needle: str, timeout: float = 10, times: int = 1) -> str:
        """The watcher's log once it holds `needle` (`times` times). A worker's lines reach the
        file through circusd's pipe, a moment after what they report has happened."""
        path = self.dir / "state" / "logs" / f"{watcher}.log"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text()
                if text.count(needle) >= times:
                    return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not {times} time(s) in {path} within {timeout}s")
            time.sleep(0.02)


def exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited; return those still running. A zombie has exited:
    only its reaping is left, and PID 1 in this sandbox reaps orphans 1-2 s late."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() >= deadline:
            return alive
        psutil.wait_procs(alive, timeout=0.05)


def all_up(states: dict[str, Any]) -> bool:
    """Every worker seen by the others: vm sees idle+forwarder, idle sees vm+forwarder."""
    vm, idle = states.get("vm"), states.get("idle")
    if not vm or not idle:
        return False
    vp, ip = vm.get("peers", {}), idle.get("peers", {})
    return all(vp.get(n, {}).get("up") for n in ("idle", "forwarder")) and \
        all(ip.get(n, {}).get("up") for n in ("vm", "forwarder"))
