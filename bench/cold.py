"""cold: VM stopped -> `ssh virby-vm true` through the forwarder, against the limit: what the
guest itself takes. The limit is the same guest booted directly by the backend's own start
(testing/direct.py: the same QEMU command line) and the same keys initrd, timed from the QEMU
exec to the guest
agent's `virby-ready` line (sshd listens), plus one `ssh true` measured on that running guest
(the handshake any client pays). No probe timing is in it: a blind `ssh` probe loop lands on a
retransmit schedule and was slower than Virby, so it was no limit. Runs alternate between the
two so drift hits both alike. Reported: Virby's overhead over the limit. Target: cold / limit
<= 1.15 (medians): the vm worker's own SSH proof (one more handshake) is most of what Virby adds.
`cold_aarch64` is the same for the aarch64 guest (qemu-system-aarch64, emulated here), against
its own limit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    Result,
    free_port,
    stop_vm,
    summary,
    timed_ssh_true,
)
from testing.direct import running
from testing.harness import Instance
from virby.core.config import Config, from_dict
from virby.core.keys import ensure_keys
from virby.supervisor.sshconfig import ssh_config_text
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.initrd import build_keyed_initrd
from virby.workers.backends.qemu import QemuBackend

NAME = "cold"
TARGET = 1.15
BOOT_DEADLINE = 90.0


class DirectGuest:
    """The limit: QEMU started by the backend's own start (testing/direct.py); nothing else in
    the way."""

    def __init__(self, guest_dir: Path, arch: str = "x86_64") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vbl", dir="/tmp"))
        data: dict[str, Any] = {
            "port": free_port(), "stateDir": str(self.dir / "state"), "runtimeDir": str(self.dir / "run"),
            "accel": "tcg", "readyTimeout": 60, "arch": arch,
            "guest": {"kernel": str(guest_dir / "vmlinuz"), "initrd": str(guest_dir / "initrd.img")},
        }
        self.config: Config = from_dict(data, source=None)
        os.makedirs(self.config.runtimeDir, mode=0o700, exist_ok=True)
        os.makedirs(self.config.log_dir, exist_ok=True)
        keys = ensure_keys(self.config.stateDir)
        ensure_disk(self.config.state("disk.raw"), self.config.diskSize)  # in the argv, as for the vm worker
        self.backend = QemuBackend(self.config, keys)
        # The same keys initrd the vm worker builds at each boot, built once, before timing.
        build_keyed_initrd(self.config, self.backend.keys, self.backend.boot_initrd)
        self.argv = self.backend.command()
        self.ssh_config = self.dir / "ssh_config"
        self.ssh_config.write_text(ssh_config_text(self.config))

    def boot_once(self) -> dict[str, float]:
        """Start QEMU, wait for the agent's `virby-ready` (sshd listens), then time one `ssh
        true` on the running guest; kill it. Returns the timings (seconds)."""
        with running(self.backend) as vm:
            ready = vm.wait_ready(BOOT_DEADLINE)
            handshake = timed_ssh_true(self.ssh_config, port=vm.port, timeout=60)
        return {"seconds": ready + handshake, "sshd_ready_seconds": ready, "ssh_true_seconds": handshake}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def virby_cold_once(inst: Instance) -> dict[str, float]:
    """VM stopped -> one `ssh virby-vm true`; then `stop` and wait for QEMU to be gone."""
    assert inst.qemu() is None, "the VM is not stopped"
    seconds = timed_ssh_true(inst.ssh_config, timeout=BOOT_DEADLINE)
    st = inst.status()["vm"]
    stop_vm(inst, cold=True)
    return {"seconds": seconds, "last_boot_seconds": float(st.get("last_boot_seconds") or 0.0)}


def run(ctx: Context, arch: str = "x86_64") -> Result:
    n = ctx.runs(full=10, quick=2)
    name = NAME if arch == "x86_64" else f"{NAME}_{arch}"
    res = Result(name, "s", target=f"cold ÷ limit ≤ {TARGET}")
    guest = ctx.guest(arch)
    direct = DirectGuest(guest, arch)
    inst = Instance(guest_dir=guest, arch=arch, onDemand={"pauseAfter": None, "stopAfter": None})
    cold: list[dict[str, float]] = []
    limit: list[dict[str, float]] = []
    try:
        inst.start()
        vargv = QemuBackend(inst.config, ensure_keys(inst.config.stateDir)).command()
        res.details["qemu_argv_virby"] = vargv
        res.details["qemu_argv_limit"] = direct.argv
        if not ctx.quick:
            ctx.log(f"{name}: warm-up boot (untimed)")
            direct.boot_once()
        for i in range(n):
            order = ("virby", "limit") if i % 2 == 0 else ("limit", "virby")
            for which in order:
                if which == "virby":
                    cold.append(virby_cold_once(inst))
                else:
                    limit.append(direct.boot_once())
            ctx.log(f"{name}: run {i + 1}/{n}: virby {cold[-1]['seconds']:.2f} s, "
                    f"limit {limit[-1]['seconds']:.2f} s")
    finally:
        inst.close()
        direct.close()
    cs = [r["seconds"] for r in cold]
    ls = [r["seconds"] for r in limit]
    res.samples = {"cold": cold, "limit": limit}
    sc, sl = summary(cs), summary(ls)
    res.measured, res.baseline = float(sc["median"]), float(sl["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.ratio <= TARGET
    overhead = [c - lim for c, lim in zip(cs, ls, strict=True)]
    res.details.update(cold=sc, limit=sl, pair_ratios=[c / lim for c, lim in zip(cs, ls, strict=True)],
                       overhead=summary(overhead),
                       limit_sshd_ready=summary([r["sshd_ready_seconds"] for r in limit]),
                       limit_ssh_true=summary([r["ssh_true_seconds"] for r in limit]),
                       virby_boot_to_proven=summary([r["last_boot_seconds"] for r in cold]))
    res.measured_text = f"{sc['median']:.2f} s ({sc['min']:.2f}–{sc['max']:.2f})"
    res.baseline_text = f"{sl['median']:.2f} s ({sl['min']:.2f}–{sl['max']:.2f})"
    res.why = (f"Virby's overhead over the guest's own time: {(res.measured - res.baseline) * 1000:+.0f} ms "
               f"(median of pairs {summary(overhead)['median'] * 1000:+.0f} ms; limit = sshd up "
               f"{res.details['limit_sshd_ready']['median']:.2f} s + ssh true "
               f"{res.details['limit_ssh_true']['median']:.2f} s)")
    json.dumps(res.details)  # fail here, not at the end of the run, if anything is not JSON
    return res
