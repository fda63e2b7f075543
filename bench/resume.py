"""resume: a paused VM (`virby pause`) -> `ssh virby-vm true`, against a warm `ssh true` on
the same VM. Samples alternate (warm, pause, resume). Target: resume <= warm + 150 ms."""

from __future__ import annotations

import contextlib
import time

from bench.common import Context, Result, summary, timed_ssh_true
from testing.harness import Instance
from virby.supervisor import control

NAME = "resume"
TARGET_EXTRA = 0.150
PAUSED_FOR = 0.5  # let every process see `paused` before the next client comes


def pause(inst: Instance) -> None:
    """`virby pause` once the vm worker has seen the last connection close: `ssh` exits a few
    milliseconds before the forwarder reports the close, and a VM paused while a connection is
    still counted open is resumed at once by design (vm.py `on_message`)."""
    inst.wait_bus(lambda s: s.get("vm", {}).get("connections") == 0, 10, "no open connection")
    for _ in range(3):
        reply = control.request(inst.config, "pause", timeout=10)
        if not reply.get("ok"):
            raise RuntimeError(f"virby pause failed: {reply.get('error')}")
        with contextlib.suppress(AssertionError):
            inst.wait_vm("paused", timeout=5)
            return
    raise RuntimeError("the VM did not stay paused after 3 pause requests")


def run(ctx: Context) -> Result:
    n = ctx.runs(full=10, quick=3)
    res = Result(NAME, "s", target=f"resume ≤ warm + {TARGET_EXTRA * 1000:.0f} ms")
    inst = ctx.running_instance()
    warm: list[float] = []
    resume: list[float] = []
    boots0 = inst.status()["vm"]["boots"]
    for _ in range(n):
        warm.append(timed_ssh_true(inst.ssh_config))
        pause(inst)
        time.sleep(PAUSED_FOR)
        resume.append(timed_ssh_true(inst.ssh_config))
    boots = inst.status()["vm"]["boots"] - boots0
    if boots:
        raise RuntimeError(f"a resume rebooted the VM ({boots} boots)")
    sr, sw = summary(resume), summary(warm)
    res.samples = {"resume": resume, "warm": warm}
    res.measured, res.baseline = float(sr["median"]), float(sw["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.measured <= res.baseline + TARGET_EXTRA
    res.details = {"resume": sr, "warm": sw, "extra_ms": (res.measured - res.baseline) * 1000}
    res.measured_text = f"{sr['median'] * 1000:.0f} ms ({sr['min'] * 1000:.0f}–{sr['max'] * 1000:.0f})"
    res.baseline_text = f"{sw['median'] * 1000:.0f} ms ({sw['min'] * 1000:.0f}–{sw['max'] * 1000:.0f})"
    res.why = f"resume − warm = {(res.measured - res.baseline) * 1000:+.0f} ms (allowed +150 ms)"
    return res
