"""release: time from the last connection closing to the hypervisor process being gone, with
pauseAfter null and stopAfter 2 s. The idle stop saves the VM to disk (issue 14), so the
hypervisor goes once the save is done. Baseline (same run): stopAfter plus the save, from the vm
worker's `suspending` to QEMU's exit, i.e. what an ideal idle timer would take.
Target: release <= stopAfter + save time + 2 s."""

from __future__ import annotations

import time

from bench.common import Context, Result, summary, timed_ssh_true, wait_pid_gone
from testing.harness import Instance

NAME = "release"
STOP_AFTER = 2.0
SLACK = 2.0


def run(ctx: Context) -> Result:
    n = ctx.runs(full=3, quick=1)
    res = Result(NAME, "s", target=f"≤ stopAfter + save + {SLACK:.0f} s")
    inst = Instance(guest_dir=ctx.guest_dir, onDemand={"pauseAfter": None, "stopAfter": STOP_AFTER})
    runs: list[dict[str, float]] = []
    try:
        inst.start()
        for i in range(n):
            timed_ssh_true(inst.ssh_config)  # boots (or restores) the VM; it closes at exit
            t_close, w_close = time.monotonic(), time.time()
            qemu = inst.qemu()
            if qemu is None:
                raise RuntimeError("no QEMU after ssh true")
            st = inst.wait_vm("suspending", "suspended", timeout=STOP_AFTER + 30)
            suspending_wall = float(st["since"])
            gone = wait_pid_gone(qemu.pid, 60)
            w_gone = time.time()
            if gone is None:
                raise RuntimeError("QEMU still there 60 s after the idle stop")
            st = inst.wait_vm("suspended", timeout=30)
            snap = st.get("snapshot") or {}
            runs.append({"release": gone - t_close, "decision": suspending_wall - w_close,
                         "to_gone": w_gone - suspending_wall, "save": float(snap.get("save_seconds") or 0.0),
                         "snapshot_mib": float(snap.get("size") or 0) / 2**20})
            ctx.log(f"release: run {i + 1}/{n}: {runs[-1]['release']:.2f} s "
                    f"(stop decided after {runs[-1]['decision']:.2f} s, save {runs[-1]['save']:.2f} s)")
    finally:
        inst.close()
    rel = [r["release"] for r in runs]
    base = [STOP_AFTER + r["to_gone"] for r in runs]
    sr, sb = summary(rel), summary(base)
    save = summary([r["save"] for r in runs])
    res.samples = {"runs": runs}
    res.measured, res.baseline = float(sr["median"]), float(sb["median"])
    res.ratio = res.measured / res.baseline
    res.passed = all(r["release"] <= STOP_AFTER + r["save"] + SLACK for r in runs)
    res.details = {"release": sr, "baseline": sb, "stop_after": STOP_AFTER, "save": save,
                   "decision": summary([r["decision"] for r in runs]),
                   "suspending_to_gone": summary([r["to_gone"] for r in runs]),
                   "snapshot_mib": summary([r["snapshot_mib"] for r in runs])}
    res.measured_text = f"{sr['median']:.2f} s ({sr['min']:.2f}–{sr['max']:.2f})"
    res.baseline_text = f"{sb['median']:.2f} s (2 s + save to exit)"
    res.why = (f"stop decided {res.details['decision']['median'] - STOP_AFTER:+.2f} s after stopAfter, "
               f"save {save['median']:.2f} s ({res.details['snapshot_mib']['median']:.0f} MiB), QEMU gone "
               f"{res.details['suspending_to_gone']['median']:.2f} s after `suspending`")
    return res
