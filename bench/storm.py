"""storm: N (64) `ssh virby-vm true` started at once against a stopped VM: how many succeed,
how many boots it took (from `virby status`), and the time to the last success. Baseline: one
lone cold `ssh true` on the same instance just before. Target: N/N with 1 boot."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

from bench.common import Context, Result, ssh_argv, summary, timed_ssh_true, wait_pid_gone
from testing.harness import Instance
from virby.supervisor import control

NAME = "storm"
CLIENTS = 64
DEADLINE = 240.0


def _stop(inst: Instance) -> None:
    qemu = inst.qemu()
    reply = control.request(inst.config, "stop", {"cold": True}, timeout=60)
    if not reply.get("ok"):
        raise RuntimeError(f"virby stop failed: {reply.get('error')}")
    if qemu is not None:
        wait_pid_gone(qemu.pid, 30)
    inst.wait_vm("stopped", timeout=30)


def run(ctx: Context) -> Result:
    res = Result(NAME, "s", target=f"{CLIENTS}/{CLIENTS} ok with 1 boot")
    # --quick bounds the run: a client the forwarder cannot serve is released after readyTimeout
    # (the harness's 60 s otherwise), still far above a 2.5 s boot.
    ready_timeout = 30 if ctx.quick else 60
    inst = Instance(guest_dir=ctx.guest_dir, readyTimeout=ready_timeout,
                    onDemand={"pauseAfter": None, "stopAfter": None})
    procs: list[subprocess.Popen[bytes]] = []
    ends: list[float | None] = [None] * CLIENTS
    rcs: list[int | None] = [None] * CLIENTS
    errors: list[str] = [""] * CLIENTS
    try:
        inst.start()
        lone = timed_ssh_true(inst.ssh_config)
        _stop(inst)
        boots0 = int(inst.status()["vm"]["boots"])
        argv = ssh_argv(inst.ssh_config)

        def wait(i: int, p: subprocess.Popen[bytes]) -> None:
            try:
                _, err = p.communicate(timeout=DEADLINE)
                errors[i] = err.decode(errors="replace").strip()[-200:]
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                errors[i] = "timed out"
            ends[i], rcs[i] = time.monotonic(), p.returncode

        t0 = time.monotonic()
        waiters = []
        for i in range(CLIENTS):
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
            procs.append(p)
            w = threading.Thread(target=wait, args=(i, p), daemon=True)
            w.start()
            waiters.append(w)
        launched = time.monotonic() - t0
        for w in waiters:
            w.join(DEADLINE + 15)
        vm = inst.status()["vm"]
        boots = int(vm["boots"]) - boots0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        inst.close()
    ok = [i for i in range(CLIENTS) if rcs[i] == 0]
    times = [e - t0 for e in ends if e is not None]
    ok_times = [ends[i] - t0 for i in ok if ends[i] is not None]  # type: ignore[operator]
    last = max(ok_times) if ok_times else float("nan")
    res.samples = {"seconds": [(e - t0) if e is not None else None for e in ends], "rc": rcs,
                   "lone_cold": lone}
    res.measured, res.baseline = last, lone
    res.ratio = last / lone
    res.passed = len(ok) == CLIENTS and boots == 1
    failures: dict[str, Any] = {str(i): errors[i] for i in range(CLIENTS) if rcs[i] != 0}
    res.details = {"clients": CLIENTS, "successes": len(ok), "boots": boots, "ready_timeout": ready_timeout,
                   "first_success": min(ok_times) if ok_times else None, "launch_seconds": launched,
                   "all_exits": summary(times) if times else None, "failures": failures}
    res.measured_text = f"{len(ok)}/{CLIENTS} ok, {boots} boot, last at {last:.2f} s"
    res.baseline_text = f"1 client: {lone:.2f} s"
    res.why = (f"{len(ok)}/{CLIENTS} succeeded with {boots} boot(s); the last "
               f"{last - lone:+.1f} s after a lone cold start")
    return res
