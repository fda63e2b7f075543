"""throughput: bulk TCP to a host-side sink through the real forwarder process, through
`socat TCP-LISTEN:p,fork,reuseaddr TCP:127.0.0.1:sink` (Debian's), and direct; plus connection
setup latency (connect until the sink's banner arrives) for each.

The forwarder runs as the real `virby.workers.forwarder` process on a listening socket we hand
it, with a stand-in vm worker (bench/fakevm.py) on the real bus that reports `running` at the
sink's address: no VM, so the guest's TCG CPU cannot be what is measured. Paths alternate in
every round. Target: forwarder >= socat (bulk MiB/s)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, Context, Result, free_port, need, percentile, stop_process, summary
from virby.core.logtail import tail_lines

NAME = "throughput"
PATHS = ("forwarder", "socat", "direct")
CHUNK = 1 << 20
IO_TIMEOUT = 60.0
MIB = 1 << 20


def _connect_banner(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    while not got.endswith(b"\r\n"):
        b = s.recv(64)
        if not b:
            s.close()
            raise ConnectionError(f"port {port} closed before the banner")
        got += b
        if len(got) > 256:
            s.close()
            raise ConnectionError(f"port {port}: no banner line")
    return s


def setup_latency(port: int) -> float:
    t0 = time.perf_counter()
    s = _connect_banner(port)
    dt = time.perf_counter() - t0
    s.close()
    return dt


def upload(port: int, size: int) -> float:
    """Seconds to push `size` bytes and get the sink's OK (the whole transfer, end to end)."""
    data = memoryview(bytes(CHUNK))
    with _connect_banner(port, IO_TIMEOUT) as s:
        t0 = time.perf_counter()
        s.sendall(f"UP {size}\n".encode())
        left = size
        while left > 0:
            k = min(CHUNK, left)
            s.sendall(data[:k])
            left -= k
        reply = s.recv(16)
        dt = time.perf_counter() - t0
    if reply != b"OK\n":
        raise ConnectionError(f"upload via port {port}: sink said {reply!r}")
    return dt


def download(port: int, size: int) -> float:
    buf = memoryview(bytearray(CHUNK))
    with _connect_banner(port, IO_TIMEOUT) as s:
        t0 = time.perf_counter()
        s.sendall(f"DOWN {size}\n".encode())
        left = size
        while left > 0:
            got = s.recv_into(buf, min(CHUNK, left))
            if got == 0:
                raise ConnectionError(f"download via port {port}: EOF with {left} bytes to go")
            left -= got
        return time.perf_counter() - t0


class Rig:
    """Sink, socat and the forwarder with its stand-in vm worker; `close()` ends them all."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vbt", dir="/tmp"))
        self.procs: list[subprocess.Popen[Any]] = []
        self.ports: dict[str, int] = {}
        self.listener: socket.socket | None = None
        self.forwarder: subprocess.Popen[Any] | None = None
        self.socat: subprocess.Popen[Any] | None = None

    def _spawn(self, argv: list[str], name: str, **kw: Any) -> subprocess.Popen[Any]:
        err = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed right after the spawn
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, **kw)
        finally:
            err.close()
        self.procs.append(proc)
        return proc

    def _read_line(self, proc: subprocess.Popen[Any], what: str, timeout: float = 20) -> str:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        import select

        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            raise RuntimeError(f"{what} did not start: {self.log_tail(what)}")
        return str(line)

    def log_tail(self, name: str) -> str:
        return "\n".join(tail_lines(str(self.dir / f"{name}.log"), 20))

    def start(self) -> Rig:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        sink = self._spawn([sys.executable, "-m", "bench.sink"], "sink", stdout=subprocess.PIPE, env=env)
        self.ports["direct"] = int(self._read_line(sink, "sink"))
        sp = free_port()
        self.socat = self._spawn([need("socat"), f"TCP-LISTEN:{sp},fork,reuseaddr",
                                  f"TCP:127.0.0.1:{self.ports['direct']}"], "socat")
        self.ports["socat"] = sp
        # The forwarder: a config of its own, a listening socket as circusd would hand it over.
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(512)
        lst.setblocking(False)
        self.listener = lst
        self.ports["forwarder"] = int(lst.getsockname()[1])
        cfg = self.dir / "config.json"
        cfg.write_text(json.dumps({
            "port": self.ports["forwarder"], "stateDir": str(self.dir / "state"),
            "runtimeDir": str(self.dir / "run"), "accel": "tcg", "readyTimeout": 30,
            "onDemand": {"pauseAfter": None, "stopAfter": None}}))
        os.makedirs(self.dir / "run", mode=0o700)
        wenv = {**env, "VIRBY_CONFIG": str(cfg), "PYTHONUNBUFFERED": "1"}
        fake = self._spawn([sys.executable, "-m", "bench.fakevm", str(self.ports["direct"])], "fakevm",
                           stdout=subprocess.PIPE, env=wenv)
        self._read_line(fake, "fakevm")
        self.forwarder = self._spawn(
            [sys.executable, "-m", "virby.workers.forwarder", "--fd", str(lst.fileno())], "forwarder",
            stdout=subprocess.DEVNULL, env=wenv, pass_fds=(lst.fileno(),))
        for path in PATHS:  # every path answers with the banner before anything is timed
            deadline = time.monotonic() + 20
            while True:
                try:
                    setup_latency(self.ports[path])
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{path} path does not work: {e}; "
                                           f"{self.log_tail(path if path != 'direct' else 'sink')}") from e
                    time.sleep(0.05)
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """CPU used so far by the forwarder and by socat (with its forked children, reaped)."""
        out: dict[str, float] = {}
        for name, proc in (("forwarder", self.forwarder), ("socat", self.socat)):
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(proc.pid).cpu_times()
                out[name] = t.user + t.system + t.children_user + t.children_system
        return out

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        if self.listener is not None:
            self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(ctx: Context) -> Result:
    rounds = ctx.runs(full=5, quick=2)
    size = ctx.runs(full=256, quick=64) * MIB
    n_setup = ctx.runs(full=300, quick=60)
    res = Result(NAME, "MiB/s", target="forwarder ≥ socat (bulk)")
    rig = Rig()
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    up: dict[str, list[float]] = {p: [] for p in PATHS}
    down: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        rig.start()
        ports = rig.ports
        for i in range(n_setup):
            for k in range(len(PATHS)):
                p = PATHS[(i + k) % len(PATHS)]
                lat[p].append(setup_latency(ports[p]))
        cpu0 = rig.cpu_seconds()
        for r in range(rounds):
            for k in range(len(PATHS)):
                p = PATHS[(r + k) % len(PATHS)]
                up[p].append(size / upload(ports[p], size) / MIB)
                down[p].append(size / download(ports[p], size) / MIB)
            ctx.log(f"throughput: round {r + 1}/{rounds}: " + ", ".join(
                f"{p} ↑{up[p][-1]:.0f} ↓{down[p][-1]:.0f} MiB/s" for p in PATHS))
        cpu1 = rig.cpu_seconds()
        moved_gib = 2 * rounds * size / (1 << 30)
        cpu_per_gib = {p: (cpu1[p] - cpu0.get(p, 0.0)) / moved_gib for p in cpu1}
        fwd_log = rig.log_tail("forwarder")
    finally:
        rig.close()
    # Bulk figure per round: both directions' bytes over both directions' time.
    bulk = {p: [2 / (1 / u + 1 / d) for u, d in zip(up[p], down[p], strict=True)] for p in PATHS}
    med = {p: float(summary(bulk[p])["median"]) for p in PATHS}
    res.samples = {"setup_seconds": lat, "up_mib_s": up, "down_mib_s": down, "bulk_mib_s": bulk}
    res.measured, res.baseline = med["forwarder"], med["socat"]
    res.ratio = res.measured / res.baseline
    res.passed = res.ratio >= 1.0
    res.details = {
        "transfer_mib": size // MIB, "rounds": rounds, "setup_connections": n_setup,
        "bulk_median_mib_s": med, "direct_ratio": med["forwarder"] / med["direct"],
        "up_median_mib_s": {p: summary(up[p])["median"] for p in PATHS},
        "down_median_mib_s": {p: summary(down[p])["median"] for p in PATHS},
        "setup_ms": {p: {"p50": percentile(lat[p], 50) * 1000, "p99": percentile(lat[p], 99) * 1000}
                     for p in PATHS},
        "cpu_seconds_per_gib": cpu_per_gib,
        "forwarder_log_tail": fwd_log[-500:],
    }
    sm = res.details["setup_ms"]
    res.measured_text = (f"{med['forwarder']:.0f} MiB/s, setup p50/p99 "
                         f"{sm['forwarder']['p50']:.2f}/{sm['forwarder']['p99']:.2f} ms")
    res.baseline_text = (f"socat {med['socat']:.0f} MiB/s, "
                         f"{sm['socat']['p50']:.2f}/{sm['socat']['p99']:.2f} ms;"
                         f" direct {med['direct']:.0f} MiB/s")
    res.why = (f"forwarder moves {res.ratio:.2f}× socat's bulk rate "
               f"({res.details['direct_ratio']:.2f}× direct)")
    return res
