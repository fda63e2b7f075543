"""cold: VM stopped -> `ssh virby-vm true` through the forwarder, against the limit: the same
guest booted directly with the same QEMU command line (from `QemuBackend.command()`) and the
same keys initrd, probed the same way (`ssh true` to its forwarded port, pinned known_hosts,
retried until it succeeds). Runs alternate between the two so drift hits both alike.
Target: cold / limit <= 1.03 (medians). `cold_aarch64` is the same for the aarch64 guest
(qemu-system-aarch64, emulated here), against its own limit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    Result,
    free_port,
    probe_until_ssh,
    summary,
    timed_ssh_true,
    wait_pid_gone,
)
from tests.harness import Instance, qmp_execute
from virby.supervisor import control
from virby.supervisor.config import Config, from_dict
from virby.supervisor.sshconfig import ssh_config_text
from virby.workers.backends.disk import ensure_disk
from virby.workers.backends.initrd import build_keyed_initrd
from virby.workers.backends.qemu.backend import _USERNET_RE, QemuBackend
from virby.workers.keys import ensure_keys

NAME = "cold"
TARGET = 1.03
BOOT_DEADLINE = 90.0
# How the limit probes: (attempts in flight, seconds between launches, seconds an attempt may
# wait for the banner). An emulated (TCG) aarch64 guest is slow twice over: each attempt that
# reaches dropbear costs it about a second of CPU (eight at once starved its boot: limit 31-32 s
# against virby's 5-11 s in 2 of 7 runs), and under load its banner can take longer than 1 s,
# so attempts cut at 1 s all failed until the load dropped (limit 27 s against virby's 15 s).
PROBING = {"x86_64": (8, 0.1, 1.0), "aarch64": (3, 0.5, 5.0)}


class DirectGuest:
    """The limit: QEMU started by us with the backend's own argv; nothing else in the way."""

    def __init__(self, guest_dir: Path, arch: str = "x86_64") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vbl", dir="/tmp"))
        data: dict[str, Any] = {
            "port": free_port(), "stateDir": str(self.dir / "state"), "runtimeDir": str(self.dir / "run"),
            "accel": "tcg", "readyTimeout": 60, "arch": arch,
            "guest": {"kernel": str(guest_dir / "vmlinuz"), "initrd": str(guest_dir / "initrd.img")},
        }
        self.config: Config = from_dict(data, source=None)
        self.in_flight, self.stagger, self.attempt_timeout = PROBING[arch]
        os.makedirs(self.config.runtimeDir, mode=0o700, exist_ok=True)
        os.makedirs(self.config.log_dir, exist_ok=True)
        keys = ensure_keys(self.config.stateDir)
        ensure_disk(self.config.state("disk.raw"), self.config.diskSize)  # in the argv, as for the vm worker
        self.backend = QemuBackend(self.config, keys)
        ensure_disk(self.config.state("disk.raw"), self.config.diskSize)  # the argv names it
        # The same keys initrd the vm worker builds at each boot, built once, before timing.
        build_keyed_initrd(self.config.guest.initrd, self.backend.keys, self.config.sshUser,
                           self.backend.boot_initrd)
        self.argv = self.backend.command()
        self.ssh_config = self.dir / "ssh_config"
        self.ssh_config.write_text(ssh_config_text(self.config))
        self.proc: subprocess.Popen[bytes] | None = None

    def boot_once(self) -> dict[str, float]:
        """Start QEMU, read its forwarded port over QMP, probe until `ssh true` works, kill it.
        Returns the timings (seconds from the QEMU exec)."""
        for path in (self.backend.qmp_path, self.backend.agent_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log = open(self.dir / "qemu.log", "ab")  # noqa: SIM115 - closed right after the spawn
        try:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        try:
            deadline = t0 + BOOT_DEADLINE
            usernet = qmp_execute(self.backend.qmp_path, "human-monitor-command",
                                  {"command-line": "info usernet"}, deadline=t0 + 10)
            m = _USERNET_RE.search(str(usernet))
            if not m:
                raise RuntimeError(f"no SSH forward in `info usernet`: {usernet!r}")
            t_port = time.monotonic()
            t_ok, attempts = probe_until_ssh(self.ssh_config, int(m.group(1)), deadline,
                                             max_in_flight=self.in_flight, stagger=self.stagger,
                                             attempt_timeout=self.attempt_timeout)
            return {"seconds": t_ok - t0, "qmp_port_seconds": t_port - t0, "attempts": attempts}
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def virby_cold_once(inst: Instance) -> dict[str, float]:
    """VM stopped -> one `ssh virby-vm true`; then `stop` and wait for QEMU to be gone."""
    assert inst.qemu() is None, "the VM is not stopped"
    seconds = timed_ssh_true(inst.ssh_config, timeout=BOOT_DEADLINE)
    st = inst.status()["vm"]
    qemu = inst.qemu()
    reply = control.request(inst.config, "stop", timeout=60)
    if not reply.get("ok"):
        raise RuntimeError(f"virby stop failed: {reply.get('error')}")
    if qemu is not None and wait_pid_gone(qemu.pid, 30) is None:
        raise RuntimeError("QEMU still there 30 s after the stop")
    inst.wait_vm("stopped", timeout=30)
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
    res.details.update(cold=sc, limit=sl, pair_ratios=[c / lim for c, lim in zip(cs, ls, strict=True)],
                       virby_boot_to_proven=summary([r["last_boot_seconds"] for r in cold]))
    res.measured_text = f"{sc['median']:.2f} s ({sc['min']:.2f}–{sc['max']:.2f})"
    res.baseline_text = f"{sl['median']:.2f} s ({sl['min']:.2f}–{sl['max']:.2f})"
    res.why = (f"cold − limit = {(res.measured - res.baseline) * 1000:+.0f} ms "
               f"(allowed +{(TARGET - 1) * res.baseline * 1000:.0f} ms)")
    json.dumps(res.details)  # fail here, not at the end of the run, if anything is not JSON
    return res
