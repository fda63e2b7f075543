"""restore: a suspended VM (`virby stop`: saved to disk, QEMU gone) -> `ssh virby-vm true`,
against a cold boot of the same guest in the same Virby (`virby stop --cold` -> `ssh true`).
Samples alternate (restore, cold, cold, restore, ...) so drift hits both alike. Also reported:
the save time, the snapshot size and the vm worker's own restore time (state loaded, clock and
entropy set, SSH proven). Target: restore <= 0.35 x cold (medians)."""

from __future__ import annotations

import json

from bench.common import Context, Result, stop_vm, summary, timed_ssh_true
from testing.harness import Instance

NAME = "restore"
TARGET = 0.35
DEADLINE = 120.0


def run(ctx: Context) -> Result:
    n = ctx.runs(full=6, quick=2)
    res = Result(NAME, "s", target=f"restore ≤ {TARGET} × cold")
    inst = Instance(guest_dir=ctx.guest_dir, onDemand={"pauseAfter": None, "stopAfter": None})
    restore: list[dict[str, float]] = []
    cold: list[dict[str, float]] = []
    try:
        inst.start()
        timed_ssh_true(inst.ssh_config, timeout=DEADLINE)  # first boot, untimed
        for i in range(n):
            for which in (("restore", "cold") if i % 2 == 0 else ("cold", "restore")):
                st = stop_vm(inst, cold=which == "cold")
                seconds = timed_ssh_true(inst.ssh_config, timeout=DEADLINE)
                vm = inst.status()["vm"]
                if which == "restore":
                    snap = st.get("snapshot") or {}
                    if not isinstance(snap, dict) or not snap:
                        raise RuntimeError("suspended without a snapshot")
                    restore.append({"seconds": seconds, "save_seconds": float(snap["save_seconds"]),
                                    "snapshot_bytes": float(snap["size"]),
                                    "worker_restore_seconds": float(vm["last_restore_seconds"])})
                else:
                    cold.append({"seconds": seconds, "worker_boot_seconds": float(vm["last_boot_seconds"])})
            ctx.log(f"restore: run {i + 1}/{n}: restore {restore[-1]['seconds']:.2f} s, "
                    f"cold {cold[-1]['seconds']:.2f} s")
        vm = inst.status()["vm"]
        if vm["restores"] != n:
            raise RuntimeError(f"{n} restores asked, {vm['restores']} done (a snapshot was refused)")
    finally:
        inst.close()
    rs, cs = [r["seconds"] for r in restore], [r["seconds"] for r in cold]
    sr, sc = summary(rs), summary(cs)
    res.samples = {"restore": restore, "cold": cold}
    res.measured, res.baseline = float(sr["median"]), float(sc["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.ratio <= TARGET
    res.details = {"restore": sr, "cold": sc,
                   "save": summary([r["save_seconds"] for r in restore]),
                   "snapshot_mib": summary([r["snapshot_bytes"] / 2**20 for r in restore]),
                   "worker_restore": summary([r["worker_restore_seconds"] for r in restore]),
                   "worker_cold_boot": summary([r["worker_boot_seconds"] for r in cold])}
    res.measured_text = f"{sr['median']:.2f} s ({sr['min']:.2f}–{sr['max']:.2f})"
    res.baseline_text = f"{sc['median']:.2f} s ({sc['min']:.2f}–{sc['max']:.2f}) cold"
    res.why = (f"restore = {res.ratio:.2f} × cold; save {res.details['save']['median']:.2f} s, "
               f"snapshot {res.details['snapshot_mib']['median']:.0f} MiB, worker restore "
               f"{res.details['worker_restore']['median']:.2f} s")
    json.dumps(res.details)
    return res
