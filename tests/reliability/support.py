"""Helpers for the reliability tier, on top of testing.harness.Instance (which they never change).

* `Prober`: a client that opens a new TCP connection every 25 ms, reads the SSH banner through
  the forwarder and closes; every attempt is classified (served, refused, cut, timeout).
* `Streamer`: one long ssh session printing numbered lines.
* `Events`: circusd's events endpoint (`watcher.<name>.spawn/reap/...`), with timestamps.
* `Resources`: fds, threads and RSS of every Virby process via psutil.

Everything is bounded in count and time; nothing sleeps for a fixed time except the client
pacing itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from testing.harness import Instance

BANNER = b"SSH-2.0"
# What every SSH client sends as soon as it connects (RFC 4253 §4.2). The forwarder dials the
# guest at once for a client that has spoken; one that says nothing waits in the silent lane.
CLIENT_IDENTIFICATION = b"SSH-2.0-virby-probe\r\n"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


FAULT_ROUNDS = env_int("VIRBY_FAULT_ROUNDS", 20)
SOAK_CONNECTIONS = env_int("VIRBY_SOAK_CONNECTIONS", 500)  # ~1.5 min under TCG; leaks: the 10,000 run


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll a cheap local condition (a file, a process) with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- one connection -------------------------------------------------------------------------------


def probe_banner(port: int, timeout: float = 30.0, speak: bool = True) -> tuple[str, float, str]:
    """Connect, send our identification as a real client does (unless not `speak`), read until
    the SSH banner, close. Returns (outcome, seconds, detail) where outcome
    is "ok", "refused" (connect failed), "cut" (accepted, then closed or reset before the
    banner) or "timeout"."""
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError as e:
        return "refused", time.monotonic() - t0, str(e)
    except TimeoutError as e:
        return "timeout", time.monotonic() - t0, f"connect: {e}"
    except OSError as e:
        return "refused", time.monotonic() - t0, str(e)
    got = b""
    try:
        s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
        if speak:
            s.sendall(CLIENT_IDENTIFICATION)
        while BANNER not in got and len(got) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                return "cut", time.monotonic() - t0, f"EOF after {got[:40]!r}"
            got += chunk
        return "ok", time.monotonic() - t0, ""
    except TimeoutError:
        return "timeout", time.monotonic() - t0, f"no banner, got {got[:40]!r}"
    except OSError as e:
        kind = "cut" if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED) else "error"
        return kind, time.monotonic() - t0, str(e)
    finally:
        with contextlib.suppress(OSError):
            # RST rather than TIME_WAIT: thousands of probes must not exhaust local ports.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()


@dataclass
class ProbeResult:
    started: float  # monotonic, before the connect
    outcome: str
    seconds: float
    detail: str
    ended: float = 0.0  # monotonic, once the outcome was seen


@dataclass
class Prober:
    """A new connection every `interval` seconds from a small thread pool (a slow connection does
    not hold up the next one), until `stop()` or `max_attempts`.

    `max_in_flight` bounds the connections waiting for a banner at once: the test guest's
    dropbear serves at most 5 unauthenticated connections per address (it closes the sixth and
    the forwarder dials again) and under TCG it answers ~15 banners a second, so an unbounded
    40/s client measures the guest's backlog, not Virby. A tick that finds the limit reached
    is counted in `skipped`; the achieved rate is reported."""

    port: int
    interval: float = 0.025
    max_attempts: int = 20000
    timeout: float = 30.0
    max_in_flight: int = 5
    results: list[ProbeResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=48, thread_name_prefix="probe")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.attempts = 0
        self.skipped = 0
        self.in_flight = 0

    def start(self) -> Prober:
        self._thread.start()
        return self

    def _one(self) -> None:
        t0 = time.monotonic()
        outcome, seconds, detail = probe_banner(self.port, self.timeout)
        ended = time.monotonic()
        with self._lock:
            self.results.append(ProbeResult(t0, outcome, seconds, detail, ended))
            self.in_flight -= 1

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set() and self.attempts < self.max_attempts:
            with self._lock:
                busy = self.in_flight >= self.max_in_flight
                if not busy:
                    self.in_flight += 1
                    self.attempts += 1
                else:
                    self.skipped += 1
            if not busy:
                self._pool.submit(self._one)
            nxt += self.interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))  # the client pacing itself

    def wait(self, timeout: float) -> None:
        """Until `max_attempts` connections were opened (then `stop()` waits for them)."""
        self._thread.join(timeout)

    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True)  # every probe has its own timeout

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.outcome for r in self.results)

    def failures(self) -> list[ProbeResult]:
        with self._lock:
            return [r for r in self.results if r.outcome != "ok"]

    def worst(self) -> float:
        with self._lock:
            return max((r.seconds for r in self.results if r.outcome == "ok"), default=0.0)


# -- a long session -------------------------------------------------------------------------------


class Streamer:
    """`ssh virby-vm` printing line-<n> every `period` seconds; a thread collects the lines."""

    def __init__(self, inst: Instance, period_us: int = 20000) -> None:
        script = f"i=0; while :; do echo line-$i; i=$((i+1)); usleep {period_us}; done"
        self.proc = inst.ssh_popen(script, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").strip()))

    def wait_lines(self, n: int, timeout: float) -> None:
        wait_until(lambda: len(self.lines) >= n or self.proc.poll() is not None, timeout,
                   f"{n} lines from the session")
        assert len(self.lines) >= n, f"session ended early: {self.stderr()}"

    def count_after(self, t: float) -> int:
        return sum(1 for ts, _ in list(self.lines) if ts > t)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def contiguous(self) -> bool:
        numbers = [int(line.removeprefix("line-")) for _, line in list(self.lines)
                   if line.startswith("line-")]
        return numbers == list(range(len(numbers)))

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)


# -- circusd's events -----------------------------------------------------------------------------


class Events:
    """Subscribes to circusd's pubsub endpoint; `events` holds (monotonic time, topic, body)."""

    def __init__(self, inst: Instance, prefix: bytes = b"watcher.") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sock.connect(inst.config.endpoint("events"))
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(100):
                frames = self.sock.recv_multipart()
                body: dict[str, Any] = {}
                with contextlib.suppress(ValueError, IndexError):
                    body = json.loads(frames[1])
                self.events.append((time.monotonic(), frames[0].decode(), body))

    def topics(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, b) for t, tp, b in list(self.events) if tp == topic]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


@contextlib.contextmanager
def circus_events(inst: Instance) -> Iterator[Events]:
    ev = Events(inst)
    try:
        # The SUB connects asynchronously: make sure it is live before the caller acts.
        wait_until(lambda: _events_live(inst, ev), 5, "the events subscription")
        yield ev
    finally:
        ev.close()


def _events_live(inst: Instance, ev: Events) -> bool:
    # An ipc subscription is live within milliseconds; one round trip through circusd's loop
    # (which also publishes the events) is enough to be sure.
    inst.circus("status")
    return True


# -- processes and resources ----------------------------------------------------------------------


def virby_processes(inst: Instance) -> dict[str, psutil.Process]:
    procs = {"circusd": psutil.Process(inst.circusd_pid())}
    for name in ("vm", "forwarder", "idle"):
        procs[name] = psutil.Process(inst.watcher_pid(name))
    qemu = inst.qemu()
    if qemu is not None:
        procs["qemu"] = qemu
    return procs


@dataclass(frozen=True)
class Usage:
    pid: int
    fds: int
    threads: int
    rss: int


def usage(procs: dict[str, psutil.Process]) -> dict[str, Usage]:
    out = {}
    for name, p in procs.items():
        with p.oneshot():
            out[name] = Usage(p.pid, p.num_fds(), p.num_threads(), p.memory_info().rss)
    return out


def assert_flat(before: dict[str, Usage], after: dict[str, Usage], *, fds: int = 4, threads: int = 2,
                rss_mib: float = 12.0, skip_rss: tuple[str, ...] = ()) -> None:
    """Same processes, and no growth beyond a small constant (no per-connection leak)."""
    problems = []
    for name, b in before.items():
        a = after[name]
        if a.pid != b.pid:
            problems.append(f"{name}: pid {b.pid} -> {a.pid} (restarted)")
            continue
        if a.fds - b.fds > fds:
            problems.append(f"{name}: fds {b.fds} -> {a.fds}")
        if a.threads - b.threads > threads:
            problems.append(f"{name}: threads {b.threads} -> {a.threads}")
        if name not in skip_rss and (a.rss - b.rss) / 2**20 > rss_mib:
            problems.append(f"{name}: rss {b.rss / 2**20:.1f} -> {a.rss / 2**20:.1f} MiB")
    assert not problems, "; ".join(problems)


def log_lines(inst: Instance, watcher: str, needle: str) -> int:
    path = Path(inst.config.log_dir) / f"{watcher}.log"
    try:
        return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)
    except FileNotFoundError:
        return 0


SNAPSHOT_CONTENT_MAX = 1 << 20


def tree_snapshot(root: Path) -> dict[str, tuple[int, bytes | int]]:
    """Mode and content of every regular file under `root` (keys, config): to prove nothing
    was corrupted. Files over 1 MiB (the guest's data disk: a sparse file of diskSize bytes,
    20 GiB by default) are recorded by size, never read into memory."""
    out: dict[str, tuple[int, bytes | int]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            content = p.read_bytes() if st.st_size <= SNAPSHOT_CONTENT_MAX else st.st_size
            out[str(p.relative_to(root))] = (st.st_mode & 0o7777, content)
    return out


def mount_tmpfs(path: Path, size: str, *extra: str) -> bool:
    """Mount a small tmpfs (root only). False when this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", "mode=0700", *extra])
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(path: Path) -> None:
    """Fill the filesystem holding `path` until ENOSPC. Unbuffered: a buffered file would raise
    ENOSPC again from its close, flushing what the failed write left behind."""
    with open(path / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    # the last partial blocks
    with contextlib.suppress(OSError), open(path / "filler2", "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 512)


# -- who sees whom --------------------------------------------------------------------------------


def views(states: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Which incarnation of each peer every worker sees as up, from the broadcasts (the
    forwarder's view travels inside the vm worker's state)."""
    vm, idle = states.get("vm") or {}, states.get("idle") or {}
    fwd = vm.get("forwarder") or {}

    def inc(view: dict[str, Any], name: str) -> str | None:
        p = (view.get("peers") or {}).get(name) or {}
        return p.get("inc") if p.get("up") else None

    return {
        "vm": {"self": vm.get("inc"), "idle": inc(vm, "idle"), "forwarder": inc(vm, "forwarder")},
        "idle": {"self": idle.get("inc"), "vm": inc(idle, "vm"), "forwarder": inc(idle, "forwarder")},
        "forwarder": {"vm": inc(fwd, "vm"), "idle": inc(fwd, "idle")},
    }


def replaced(victim: str, old_pid: int) -> Callable[[dict[str, Any]], bool]:
    """A predicate for Instance.wait_bus: every other worker sees a new incarnation of `victim`."""
    others = [n for n in ("vm", "forwarder", "idle") if n != victim]
    old = f"{old_pid}-"

    def healed(states: dict[str, Any]) -> bool:
        if "vm" not in states or "idle" not in states:
            return False
        v = views(states)
        seen = [v[o].get(victim) for o in others]
        if victim in ("vm", "idle"):
            seen.append(v[victim]["self"])
        return all(s is not None and not s.startswith(old) for s in seen)

    return healed


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures a test measured; also append them to $VIRBY_RELIABILITY_REPORT."""
    line = json.dumps({"test": name, **figures}, default=str)
    print(f"\nFIGURES {line}")
    path = os.environ.get("VIRBY_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running. A zombie has exited
    (orphans are reaped by PID 1, which in some sandboxes does so late)."""
    def running() -> list[psutil.Process]:
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + timeout
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def stop_arbiter(inst: Instance, timeout: float = 60) -> None:
    """SIGTERM `virby run` (circusd) and wait, keeping the instance's dirs for a new start."""
    assert inst.proc is not None
    inst.proc.terminate()
    inst.proc.wait(timeout)
