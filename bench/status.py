"""status: wall time of `virby status` (the whole process: interpreter, imports, one round over
the bus and circusd) against a running Virby with the VM stopped, 15 runs (--quick 7).
Baseline: a bare `python -c pass`, measured in the same run and interleaved with the status
runs (the floor for any Python command). Target: median ≤ 100 ms."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import Context, Result, spread_text, summary
from testing.harness import Instance

NAME = "status"
TARGET_S = 0.100


def _timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    dt = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}… exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return dt


def run(ctx: Context) -> Result:
    n = ctx.runs(full=15, quick=7)
    res = Result(NAME, "s", target=f"median ≤ {TARGET_S * 1000:.0f} ms")
    status_argv = [sys.executable, "-m", "virby.supervisor.cli", "status"]
    bare_argv = [sys.executable, "-c", "pass"]
    inst = Instance(guest_dir=None)
    try:
        inst.start()
        argv = [*status_argv, "--config", str(inst.config_path)]
        _timed(argv)  # warm the page cache (untimed)
        status, bare = [], []
        for _ in range(n):  # interleaved: a load change on the machine hits both alike
            status.append(_timed(argv))
            bare.append(_timed(bare_argv))
        state = inst.status()["vm"]["state"]
    finally:
        inst.close()
    s, b = summary(status), summary(bare)
    res.samples = {"status_seconds": status, "bare_python_seconds": bare}
    res.measured, res.baseline = float(s["median"]), float(b["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.measured <= TARGET_S
    res.details = {"status": s, "bare_python": b, "vm_state": state}
    res.measured_text = spread_text(status, 1000, "ms", 0)
    res.baseline_text = f"python -c pass {spread_text(bare, 1000, 'ms', 0)}"
    res.why = f"median {res.measured * 1000:.0f}/{TARGET_S * 1000:.0f} ms"
    return res
