"""release: time from the last connection closing to the hypervisor process being gone, with
pauseAfter null and stopAfter 2 s. Baseline (same run): stopAfter plus the guest's own power-off
time (from the vm worker's `stopping` to QEMU's exit), i.e. what an ideal idle timer would
take. Target: release <= stopAfter + 2 s."""

from __future__ import annotations

import time

from bench.common import Context, Result, summary, timed_ssh_true, wait_pid_gone
from tests.harness import Instance

NAME = "release"
STOP_AFTER = 2.0
SLACK = 2.0


def run(ctx: Context) -> Result:
    n = ctx.runs(full=3, quick=1)
    res = Result(NAME, "s", target=f"≤ stopAfter + {SLACK:.0f} s = {STOP_AFTER + SLACK:.0f} s")
    inst = Instance(guest_dir=ctx.guest_dir, onDemand={"pauseAfter": None, "stopAfter": STOP_AFTER})
    runs: list[dict[str, float]] = []
    try:
        inst.start()
        for i in range(n):
            timed_ssh_true(inst.ssh_config)  # boots the VM; it closes at exit
            t_close, w_close = time.monotonic(), time.time()
            qemu = inst.qemu()
            if qemu is None:
                raise RuntimeError("no QEMU after ssh true")
            st = inst.wait_vm("stopping", "stopped", timeout=STOP_AFTER + 30)
            stopping_wall = float(st["since"])
            gone = wait_pid_gone(qemu.pid, 60)
            w_gone = time.time()
            if gone is None:
                raise RuntimeError("QEMU still there 60 s after the idle stop")
            inst.wait_vm("stopped", timeout=30)
            runs.append({"release": gone - t_close, "decision": stopping_wall - w_close,
                         "poweroff": w_gone - stopping_wall})
            ctx.log(f"release: run {i + 1}/{n}: {runs[-1]['release']:.2f} s "
                    f"(stop decided after {runs[-1]['decision']:.2f} s)")
    finally:
        inst.close()
    rel = [r["release"] for r in runs]
    base = [STOP_AFTER + r["poweroff"] for r in runs]
    sr, sb = summary(rel), summary(base)
    res.samples = {"runs": runs}
    res.measured, res.baseline = float(sr["median"]), float(sb["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.measured <= STOP_AFTER + SLACK
    res.details = {"release": sr, "baseline": sb, "stop_after": STOP_AFTER,
                   "decision": summary([r["decision"] for r in runs]),
                   "poweroff": summary([r["poweroff"] for r in runs])}
    res.measured_text = f"{sr['median']:.2f} s ({sr['min']:.2f}–{sr['max']:.2f})"
    res.baseline_text = f"{sb['median']:.2f} s (2 s + power-off)"
    res.why = (f"stop decided {res.details['decision']['median'] - STOP_AFTER:+.2f} s after stopAfter, "
               f"power-off {res.details['poweroff']['median']:.2f} s")
    return res
