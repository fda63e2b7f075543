"""Soak: VIRBY_SOAK_CONNECTIONS connections (default 500; the full run is 10,000, see
docs/reliability.md) in bursts, with the idle monitor pausing and stopping the VM in between,
so every burst starts from a paused or a stopped VM. Every connection must be served, and the
fds, threads and RSS of circusd and the three watchers must stay flat (QEMU is a new process
after each stop: its threads must match the first one's)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testing.harness import Instance
from tests.reliability.support import SOAK_CONNECTIONS, Prober, assert_flat, report, usage, virby_processes

pytestmark = pytest.mark.reliability

BURSTS = 8  # alternately ended by a pause and by a stop


def _burst(inst: Instance, n: int) -> Prober:
    prober = Prober(inst.port, interval=0.0, max_attempts=n, timeout=120).start()
    prober.wait(max(60.0, float(n)))  # bounded: at most ~1 s per connection
    prober.stop()
    return prober


def test_soak(guest_dir: Path) -> None:
    per_burst = max(1, SOAK_CONNECTIONS // BURSTS)
    with Instance(guest_dir=guest_dir, onDemand={"pauseAfter": 1, "stopAfter": 3}) as inst:
        inst.start()
        t0 = time.monotonic()
        served, failures, cycles = 0, [], {"paused": 0, "suspended": 0}
        baseline = qemu_first = None
        for i in range(BURSTS):
            p = _burst(inst, per_burst)
            served += p.counts()["ok"]
            failures += p.failures()
            procs = virby_processes(inst)
            now = usage(procs)
            if baseline is None:  # after the first burst: everything allocated once
                baseline = {k: v for k, v in now.items() if k != "qemu"}
                qemu_first = now.get("qemu")
            last, last_qemu = {k: v for k, v in now.items() if k != "qemu"}, now.get("qemu")
            end = "suspended" if i % 2 else "paused"
            inst.wait_vm(end, timeout=60)
            cycles[end] += 1
        elapsed = time.monotonic() - t0
        st = inst.status()["vm"]
        assert baseline is not None and qemu_first is not None and last_qemu is not None
        report("soak", {"connections": per_burst * BURSTS, "served": served, "failures": len(failures),
                        "seconds": round(elapsed, 1), "per_second": round(per_burst * BURSTS / elapsed, 1),
                        "pause_cycles": cycles["paused"], "stop_cycles": cycles["suspended"],
                        "boots": st["boots"], "restores": st["restores"],
                        "start": {k: (v.fds, v.threads, round(v.rss / 2**20, 1))
                                  for k, v in baseline.items()},
                        "end": {k: (v.fds, v.threads, round(v.rss / 2**20, 1)) for k, v in last.items()},
                        "qemu_first_last": [(qemu_first.fds, qemu_first.threads),
                                            (last_qemu.fds, last_qemu.threads)]})
        assert failures == [], failures[:5]
        assert served == per_burst * BURSTS
        # every idle stop saved the VM and the next burst restored it: one cold boot in all
        # (else the vm worker's log says which save or restore failed, and why)
        vm_log = (inst.dir / "state" / "logs" / "vm.log").read_text()
        assert st["boots"] == 1, [line for line in vm_log.splitlines()
                                  if "not restored" in line or "could not save" in line]
        assert st["restores"] == cycles["suspended"] - (1 if BURSTS % 2 == 0 else 0)
        assert_flat(baseline, last, fds=4, threads=2, rss_mib=10)
        # QEMU's fd count follows the guest's open forwarded connections (slirp), so only its
        # threads are compared; it is a new process after every stop anyway.
        assert abs(last_qemu.threads - qemu_first.threads) <= 2
