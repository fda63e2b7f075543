"""What every benchmark shares: the result record, statistics, machine facts, stopping the VM,
timed `ssh true` probes.

Every loop here is bounded in time and count; every process started here is ended by its
caller in a `finally`.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testing.harness import Instance, guest_for
from virby.supervisor import control

REPO = Path(__file__).resolve().parents[1]


# -- the record ----------------------------------------------------------------------------------


@dataclass
class Result:
    """One benchmark's outcome. `measured`, `baseline` and `ratio` are numbers in `unit`
    (None only when the benchmark failed: `error` says why)."""

    name: str
    unit: str
    measured: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    measured_text: str = ""
    baseline_text: str = ""
    why: str = ""  # one line: what decided PASS/FAIL
    samples: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "unit": self.unit, "measured": self.measured,
            "baseline": self.baseline, "ratio": self.ratio, "target": self.target,
            "pass": self.passed, "measured_text": self.measured_text,
            "baseline_text": self.baseline_text, "why": self.why, "samples": self.samples,
            "details": self.details, "error": self.error, "seconds": round(self.seconds, 3),
        }


@dataclass
class Context:
    """Run-wide settings and the guest folder; `log` prints progress lines."""

    quick: bool
    guest_dir: Path
    log: Callable[[str], None]
    _shared: dict[str, Instance] = field(default_factory=dict)

    def runs(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def guest(self, arch: str) -> Path:
        """The guest folder for `arch` (the run's own for x86_64, built on first use otherwise)."""
        return self.guest_dir if arch == "x86_64" else guest_for(arch)

    def running_instance(self, arch: str = "x86_64") -> Instance:
        """A Virby whose VM is booted and never idles out, shared by `warm` and `resume`."""
        inst = self._shared.get(f"running-{arch}")
        if inst is None:
            inst = Instance(guest_dir=self.guest(arch), arch=arch,
                            onDemand={"pauseAfter": None, "stopAfter": None})
            self._shared[f"running-{arch}"] = inst
            inst.start()
            out = inst.ssh("true", timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"first ssh true failed: {out.stderr.strip()}")
            # Let the freshly booted guest settle, then warm both paths once (untimed).
            time.sleep(2.0)
            for _ in range(2):
                inst.ssh("true", timeout=60)
        return inst

    def close(self) -> None:
        for inst in self._shared.values():
            inst.close()
        self._shared.clear()


# -- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolation percentile (p in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """median and spread of some samples."""
    xs = list(values)
    return {
        "n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
        "mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "p10": percentile(xs, 10), "p90": percentile(xs, 90),
    }


def spread_text(values: Sequence[float], scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    s = summary(values)
    return (f"{s['median'] * scale:.{digits}f} {unit} "
            f"({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}, n={s['n']})")


# -- the machine ---------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
        "mem_total_mib": mem_kib // 1024,
        "os": _first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "python": platform.python_version(), "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "socat": _socat_version(), "ssh": _first_line(["ssh", "-V"]),
        "kvm_usable": False, "accel": "tcg", "git_commit": commit, "git_dirty": bool(dirty),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in out.stdout.splitlines():
        if line.startswith("socat version"):
            return line.strip()
    return ""


# -- processes -----------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace`; always reaps. Only for processes we started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary} not found on PATH")
    return found


# -- the VM ------------------------------------------------------------------------------------


def stop_vm(inst: Instance, cold: bool) -> dict[str, object]:
    """`virby stop [--cold]` once the last connection is seen closed; wait for QEMU to go."""
    inst.wait_bus(lambda s: s.get("vm", {}).get("connections") == 0, 10, "no open connection")
    qemu = inst.qemu()
    reply = control.request(inst.config, "stop", {"cold": cold}, timeout=60)
    if not reply.get("ok"):
        raise RuntimeError(f"virby stop failed: {reply.get('error')}")
    if qemu is not None and wait_pid_gone(qemu.pid, 30) is None:
        raise RuntimeError("QEMU still there 30 s after the stop")
    st = inst.wait_vm("stopped" if cold else "suspended", timeout=30)
    return dict(st)


# -- ssh -----------------------------------------------------------------------------------------


def ssh_argv(ssh_config: Path, *, port: int | None = None, connect_timeout: float | None = None) -> list[str]:
    """`ssh true` against the `virby-vm` alias of a Virby ssh_config (pinned host key, client
    key, batch mode); `port` overrides the port (the guest's own forward), as does the timeout.
    One connection each: the config's shared connection (ControlMaster) is off."""
    argv = ["ssh", "-F", str(ssh_config), "-o", "ControlPath=none"]
    if port is not None:
        argv += ["-o", f"Port={port}"]
    if connect_timeout is not None:
        argv += ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
    return [*argv, "virby-vm", "--", "true"]


def timed_ssh_true(ssh_config: Path, *, port: int | None = None, timeout: float = 120) -> float:
    """Seconds for one `ssh true` (process start to exit). Raises RuntimeError if it fails."""
    t0 = time.monotonic()
    out = subprocess.run(ssh_argv(ssh_config, port=port), capture_output=True, text=True,
                         timeout=timeout, check=False)
    dt = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"ssh true exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return dt


class _Probe:
    """One `ssh true` attempt whose exit time is recorded by a waiter thread."""

    def __init__(self, argv: list[str], done: threading.Event) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.ended: float | None = None
        self.rc: int | None = None
        self._done = done
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        rc = self.proc.wait()
        self.ended, self.rc = time.monotonic(), rc
        self._done.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self._thread.join(10)


def probe_until_ssh(ssh_config: Path, port: int, deadline: float, *, stagger: float = 0.1,
                    max_in_flight: int = 8, attempt_timeout: float = 1.0) -> tuple[float, int]:
    """Retry `ssh true` to `port` until one succeeds; return (monotonic time of the first
    success, attempts). Attempts overlap (a new one every `stagger` seconds, at most
    `max_in_flight` at once) so attempts stuck in QEMU's SYN retransmit while the guest NIC
    comes up cost nothing and the first moment sshd answers is caught within about
    `stagger`: the limit is as tight as an `ssh` client can make it. Attempts that dropbear turns
    away (over its 5 unauthenticated connections per address) just fail; another one wins.
    Raises TimeoutError at `deadline`."""
    done = threading.Event()
    probes: list[_Probe] = []
    argv = ssh_argv(ssh_config, port=port, connect_timeout=attempt_timeout)
    last_launch = -math.inf
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no successful ssh true within the deadline ({len(probes)} attempts)")
            wins = [p.ended for p in probes if p.rc == 0 and p.ended is not None]
            if wins:
                return min(wins), len(probes)
            in_flight = sum(1 for p in probes if p.rc is None)
            gap = stagger if in_flight else 0.02
            if in_flight < max_in_flight and now - last_launch >= gap and len(probes) < 2000:
                probes.append(_Probe(argv, done))
                last_launch = now
            done.clear()
            done.wait(0.01)
    finally:
        for p in probes:
            p.kill()


def wait_pid_gone(pid: int, timeout: float) -> float | None:
    """Block until process `pid` exits (a pidfd: exact, no polling); return the monotonic time
    it was seen gone, or None on timeout."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.monotonic()
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(int(timeout * 1000)):
            return time.monotonic()
        return None
    finally:
        os.close(fd)
