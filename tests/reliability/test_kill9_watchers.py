"""kill -9 of each watcher, VIRBY_FAULT_ROUNDS times (default 20), while a client opens a new
connection every 25 ms through the forwarder to the running VM (reads the SSH banner, closes;
at most 5 waiting for a banner at once, see support.Prober) and one long ssh session streams
numbered lines.

What a user must see: no connection is ever refused (circusd keeps the listening socket, new
clients wait in its backlog); the long session lives through vm and idle kills; the VM is
never rebooted by a vm-worker kill (same QEMU pid, same boot count). Connections that were in
flight inside a forwarder that was killed may be cut; they are counted and must each overlap
a forwarder kill.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from testing.harness import Instance
from tests.reliability.support import FAULT_ROUNDS, Prober, Streamer, replaced, report, wait_until

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("victim", ["idle", "vm", "forwarder"])
def test_kill_9_under_load(booted: Instance, victim: str) -> None:
    inst = booted
    vm0 = inst.wait_vm("running")
    qemu = inst.qemu()
    assert qemu is not None and vm0["pid"] == qemu.pid
    boots = vm0["boots"]
    session = Streamer(inst)
    session.wait_lines(5, 60)
    prober = Prober(inst.port).start()
    kills: list[tuple[float, float]] = []  # (just before os.kill, just after)
    heal_times: list[float] = []
    t_start = time.monotonic()
    try:
        for _ in range(FAULT_ROUNDS):
            pid = inst.watcher_pid(victim)
            t = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kills.append((t, time.monotonic()))
            healed = replaced(victim, pid)
            # a new vm worker proves the guest it adopts (one SSH login) before `running`
            states = inst.wait_bus(lambda s, healed=healed: healed(s) and s["vm"].get("state") == "running",  # type: ignore[misc]
                                   15, f"a new {victim} seen by the others")
            heal_times.append(time.monotonic() - t)
            vm = states["vm"]
            assert vm["state"] == "running", vm
            assert vm["pid"] == qemu.pid, "the VM was replaced"
            assert vm["boots"] == boots, "the VM was rebooted"
        # keep the client going a little after the last kill: the system serves again
        after_last = prober.attempts + 40
        wait_until(lambda: prober.attempts >= after_last, 10, "40 more connections")
        if victim != "forwarder":
            n = len(session.lines)
            session.wait_lines(n + 20, 30)  # still streaming after the last kill
    finally:
        prober.stop()
    elapsed = time.monotonic() - t_start
    counts = prober.counts()
    failures = prober.failures()
    session_alive = session.alive()
    contiguous = session.contiguous()
    lines = len(session.lines)
    session.close()
    assert qemu.is_running() and inst.qemu() is not None and inst.qemu().pid == qemu.pid  # type: ignore[union-attr]
    assert inst.status()["vm"]["boots"] == boots
    report(f"kill9[{victim}]", {
        "rounds": FAULT_ROUNDS, "seconds": round(elapsed, 1), "attempts": len(prober.results),
        "per_second": round(len(prober.results) / elapsed, 1), "skipped_ticks": prober.skipped,
        "outcomes": dict(counts), "worst_ok_latency_s": round(prober.worst(), 3),
        "heal_s_median": round(sorted(heal_times)[len(heal_times) // 2], 3),
        "heal_s_max": round(max(heal_times), 3), "session_lines": lines,
        "session_alive": session_alive})

    assert counts["refused"] == 0, [f.detail for f in failures if f.outcome == "refused"][:5]
    assert counts["timeout"] == 0 and counts["error"] == 0, failures[:5]
    if victim == "forwarder":
        # Only connections that were inside a forwarder when it died may be cut: each began
        # before a kill and was seen cut after it (an order of events, no slack in seconds).
        for f in (f for f in failures if f.outcome == "cut"):
            assert any(f.started <= after and before <= f.ended for before, after in kills), f
    else:
        assert counts["cut"] == 0, failures[:5]
        assert session_alive, "the long session died"
        assert contiguous, "the long session lost or reordered lines"
