"""nixbuild: the host's `nix-build` of a fresh tiny derivation (a nonce; `--max-jobs 0`, so it
must run on `virby-vm`), on the Nix guest, from three starting points alternated in one run:
the VM running, suspended (`virby stop`: saved to disk, QEMU gone) and stopped cold (`virby
stop --cold`). The order rotates each round so drift and after-effects hit all three alike.

Target: suspended ≤ running + the vm worker's own restore time (medians, the restore as
`virby status` reports it: state loaded, clock and entropy set, SSH proven) + 0.25 s. A restore
is the only work a suspended wake adds, and the restored guest keeps its page cache and its
warm Nix, so the build itself should cost what it costs on a running VM; the 0.25 s is about
one SSH handshake here (the `warm` bench), room for the forwarder's hand-over once the VM is
published running. cold / running is reported beside it: what a suspend saves a build.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.common import Context, Result, stop_vm, summary
from testing.harness import Instance, build_guest
from testing.nixhost import GUEST_HOSTNAMES, Nix, Where, alias_builders

NAME = "nixbuild"
MODES = ("running", "suspended", "cold")
TARGET_EXTRA = 0.25  # s over running + the worker's restore


def prepare(inst: Instance, mode: str) -> None:
    """Put the VM in `mode`'s starting state (the previous build left it running)."""
    if mode == "running":
        inst.wait_bus(lambda s: s.get("vm", {}).get("connections") == 0, 10, "no open connection")
        inst.wait_vm("running", timeout=5)
    else:
        stop_vm(inst, cold=mode == "cold")


def build_once(inst: Instance, nix: Nix, mode: str) -> dict[str, Any]:
    """One timed build from `mode`; checks it ran in the VM and woke it the way `mode` says."""
    prepare(inst, mode)
    before = inst.status()["vm"]
    build = nix.build(builders=alias_builders())
    if build.proc.returncode != 0:
        raise RuntimeError(f"nix-build from {mode} exited {build.proc.returncode}: "
                           f"{build.proc.stderr.strip()[-400:]}")
    where = Where.read(build.out)
    if where.hostname not in GUEST_HOSTNAMES:
        raise RuntimeError(f"the build from {mode} ran on {where.hostname!r}, not in the VM")
    vm = inst.status()["vm"]
    woke = {"boots": vm["boots"] - before["boots"], "restores": vm["restores"] - before["restores"]}
    expected = {"running": {"boots": 0, "restores": 0}, "suspended": {"boots": 0, "restores": 1},
                "cold": {"boots": 1, "restores": 0}}[mode]
    if woke != expected:
        raise RuntimeError(f"the build from {mode} woke the VM as {woke}, not {expected}")
    sample: dict[str, Any] = {"seconds": build.seconds}
    if mode == "suspended":
        sample["worker_restore_seconds"] = float(vm["last_restore_seconds"])
        snap = before.get("snapshot") or {}
        sample["snapshot_bytes"], sample["save_seconds"] = int(snap["size"]), float(snap["save_seconds"])
    elif mode == "cold":
        sample["worker_boot_seconds"] = float(vm["last_boot_seconds"])
    return sample


def spread(s: dict[str, float | int]) -> str:
    return f"{s['median']:.2f} s (p10–p90 {s['p10']:.2f}–{s['p90']:.2f}, n={s['n']})"


def run(ctx: Context) -> Result:
    if shutil.which("nix-build") is None:
        raise RuntimeError("nix-build is not on PATH: apt-get install -y --no-install-recommends nix-bin")
    n = ctx.runs(full=8, quick=2)
    res = Result(NAME, "s", target=f"suspended ≤ running + restore + {TARGET_EXTRA * 1000:.0f} ms")
    ctx.log(f"{NAME}: building (or reusing) the Nix guest")
    guest: Path = build_guest(with_nix=True)
    inst = Instance(guest_dir=guest, memory=512, onDemand={"pauseAfter": None, "stopAfter": None})
    nix = Nix(inst.dir, inst.ssh_config)
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        inst.start()
        first = nix.build(builders=alias_builders())  # first boot and the host's first eval, untimed
        if first.proc.returncode != 0:
            raise RuntimeError(f"the first nix-build failed: {first.proc.stderr.strip()[-400:]}")
        for i in range(n):
            order = MODES[i % 3:] + MODES[:i % 3]
            for mode in order:
                samples[mode].append(build_once(inst, nix, mode))
            ctx.log(f"{NAME}: round {i + 1}/{n}: " + ", ".join(
                f"{m} {samples[m][-1]['seconds']:.2f} s" for m in MODES))
    finally:
        nix.delete_outputs()
        inst.close()
    s = {m: summary([x["seconds"] for x in samples[m]]) for m in MODES}
    restore = summary([x["worker_restore_seconds"] for x in samples["suspended"]])
    cold_boot = summary([x["worker_boot_seconds"] for x in samples["cold"]])
    running, suspended, cold = (float(s[m]["median"]) for m in MODES)
    res.samples = samples
    res.measured, res.baseline, res.ratio = suspended, running, suspended / running
    allowed = running + float(restore["median"]) + TARGET_EXTRA
    res.passed = suspended <= allowed
    res.details = {**s, "worker_restore": restore, "worker_cold_boot": cold_boot,
                   "suspended_over_running": suspended / running, "cold_over_running": cold / running,
                   "suspended_over_cold": suspended / cold, "allowed_suspended": allowed,
                   "save": summary([x["save_seconds"] for x in samples["suspended"]]),
                   "snapshot_mib": summary([x["snapshot_bytes"] / 2**20 for x in samples["suspended"]])}
    res.measured_text = f"suspended {spread(s['suspended'])}"
    res.baseline_text = f"running {spread(s['running'])}"
    res.why = (f"suspended = {res.ratio:.2f} × running (allowed ≤ {allowed:.2f} s: worker restore "
               f"{restore['median']:.2f} s); cold {spread(s['cold'])} = {cold / running:.2f} × running")
    for m in MODES:
        ctx.log(f"{NAME}: {m:9} {spread(s[m])}")
    return res
