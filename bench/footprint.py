"""footprint: RSS (sum and per process) and CPU of circusd and the three workers with the VM
stopped, over a window (30 s; --quick 5 s). Baseline: as many bare Python interpreters, idle,
measured in the same run (the floor for a four-process Python design).
Target: <= 90 MiB RSS in total and <= 0.5 % CPU (of one core)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Any

import psutil

from bench.common import Context, Result, stop_process
from testing.harness import Instance

NAME = "footprint"
RSS_TARGET_MIB = 90.0
CPU_TARGET_PCT = 0.5
MIB = 1 << 20


def _tree(inst: Instance) -> dict[str, psutil.Process]:
    """circusd and its workers by role (the watcher name from circus)."""
    out = {"circusd": psutil.Process(inst.circusd_pid())}
    for name in ("vm", "forwarder", "idle"):
        out[name] = psutil.Process(inst.watcher_pid(name))
    return out


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _mem(p: psutil.Process) -> dict[str, float]:
    """RSS, and USS/PSS (shared libraries counted once: the memory really used). Reads smaps,
    which is slow on a loaded machine: once per process, at the end of the window."""
    m = p.memory_full_info()
    return {"rss": m.rss / MIB, "uss": m.uss / MIB, "pss": getattr(m, "pss", 0.0) / MIB}


def _faults(p: psutil.Process) -> tuple[int, int]:
    """(minor, major) page faults so far, from /proc/<pid>/stat: page reclaim on the host
    (kdamond, memory pressure) shows here as refaults and costs CPU."""
    try:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[7]), int(fields[9])
    except (OSError, IndexError, ValueError):
        return 0, 0


def _pressure() -> dict[str, str]:
    out = {}
    for kind in ("cpu", "memory"):
        with contextlib.suppress(OSError), open(f"/proc/pressure/{kind}") as f:
            out[kind] = f.read().strip().replace("\n", "; ")
    return out


def _bare_pythons(n: int, settle: float) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE) for _ in range(n)]
    try:
        time.sleep(settle)
        return [psutil.Process(p.pid).memory_info().rss / MIB for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.close()
            stop_process(p)


def run(ctx: Context) -> Result:
    window = 5.0 if ctx.quick else 30.0
    res = Result(NAME, "MiB", target=f"≤ {RSS_TARGET_MIB:.0f} MiB RSS, ≤ {CPU_TARGET_PCT} % CPU")
    inst = Instance(guest_dir=ctx.guest_dir)
    try:
        inst.start()
        time.sleep(2.0)  # past the early heartbeats and start-up work
        procs = _tree(inst)
        if inst.qemu() is not None:
            raise RuntimeError("the VM is running; footprint is for a stopped VM")
        cpu0 = {n: _cpu(p) for n, p in procs.items()}
        faults0 = {n: _faults(p) for n, p in procs.items()}
        rss0 = {n: p.memory_info().rss / MIB for n, p in procs.items()}
        pressure0 = _pressure()
        t0 = time.monotonic()
        rss_series: list[float] = []
        end = t0 + window
        for _ in range(int(window) + 2):  # one sample a second, bounded in count and time
            rss_series.append(sum(p.memory_info().rss for p in procs.values()) / MIB)
            if time.monotonic() >= end:
                break
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        wall = time.monotonic() - t0
        cpu_pct = {n: (_cpu(p) - cpu0[n]) / wall * 100 for n, p in procs.items()}
        faults = {n: [a - b for a, b in zip(_faults(p), faults0[n], strict=True)] for n, p in procs.items()}
        mems = {n: _mem(p) for n, p in procs.items()}
        pressure1 = _pressure()
        vm_state = inst.status()["vm"]["state"]
    finally:
        inst.close()
    bare = _bare_pythons(len(procs), 1.0)
    total_rss = max(rss_series)
    total_cpu = sum(cpu_pct.values())
    res.samples = {"rss_total_mib": rss_series, "window_seconds": wall}
    res.measured, res.baseline = total_rss, sum(bare)
    res.ratio = total_rss / sum(bare)
    res.passed = total_rss <= RSS_TARGET_MIB and total_cpu <= CPU_TARGET_PCT
    per: dict[str, Any] = {n: {**mems[n], "rss_at_start": rss0[n], "cpu_pct": cpu_pct[n],
                               "minflt_majflt": faults[n]}
                           for n in procs}
    res.details = {"pressure_before": pressure0, "pressure_after": pressure1,
                   "rss_first_mib": rss_series[0], "rss_last_mib": rss_series[-1], "per_process": per,
                   "cpu_pct_total": total_cpu, "rss_total_mib": total_rss,
                   "uss_total_mib": sum(m["uss"] for m in mems.values()),
                   "pss_total_mib": sum(m["pss"] for m in mems.values()),
                   "bare_python_rss_mib": bare, "vm_state": vm_state}
    res.measured_text = (f"{total_rss:.1f} MiB RSS (USS {res.details['uss_total_mib']:.1f}), "
                         f"{total_cpu:.2f} % CPU")
    res.baseline_text = f"{len(bare)} bare pythons {sum(bare):.1f} MiB"
    res.why = (f"RSS {total_rss:.1f}/{RSS_TARGET_MIB:.0f} MiB, CPU {total_cpu:.2f}/{CPU_TARGET_PCT} % over "
               f"{wall:.0f} s")
    return res
