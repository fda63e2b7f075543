"""Issue 20: the faults a fault campaign found, each pinned with a real VM and a real circusd.

* a frozen hypervisor (SIGSTOP of QEMU) with a connection open: noticed, killed, `failed` with
  the reason within 15 s; a new client waits a bounded time and gets a recovered VM;
* kill -9 of the vm worker while `suspending`: the VM is never lost (its /tmp survives) and
  the idle monitor's stop request ends within 2 s of the new worker;
* kill -9 of the vm worker while `starting`: the half-booted guest is proven by the new worker
  and the waiting client served within 2 s of `running`;
* 200 silent connections do not hold up one real `ssh true`;
* an edited config (memory) + reload: pending in `virby status`, taken at the next boot.

Boots are shared where the faults allow: one VM for the silent connections then the freeze.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testing.harness import Instance
from tests.reliability.conftest import boot
from tests.reliability.support import Streamer, log_lines, probe_banner, report, wait_until
from virby.workers import forwarder

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def shared(guest_dir: Path) -> Iterator[Instance]:
    """One running VM for the silent-connection test, then the freeze (which replaces it)."""
    with Instance(guest_dir=guest_dir) as inst:
        yield boot(inst)


def timed_ssh(inst: Instance, *command: str,
              timeout: float = 120) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    out = inst.ssh(*command, timeout=timeout)
    return time.monotonic() - t0, out


# Every guest process's name (a process may end between the glob and cat: hence `true`).
GUEST_PROCESSES = "cat /proc/[0-9]*/comm 2>/dev/null; true"


def vm_inc(states: dict[str, Any]) -> str:
    return str(states.get("vm", {}).get("inc") or "")


# -- 200 silent connections -------------------------------------------------------------------


def test_silent_connections_do_not_delay_a_real_client(shared: Instance) -> None:
    """300 connections that never spoke delayed a real client by 33 s: the forwarder dialled
    for them in arrival order and they used up dropbear's unauthenticated sessions. Now a real
    client logs in while 200 silent ones are held, and the guest's sshd sees at most the
    silent lane's one of them (the other 199 never reached it). Its time against `ssh true`
    alone is reported (a loaded host judges nothing)."""
    inst = shared
    inst.wait_vm("running")
    assert inst.ssh("true").returncode == 0  # the first login warms the guest's caches
    alone = []
    for _ in range(3):
        took, out = timed_ssh(inst, "true")
        assert out.returncode == 0, out.stderr
        alone.append(took)
    baseline = statistics.median(alone)
    silent: list[socket.socket] = []
    try:
        for _ in range(200):
            silent.append(socket.create_connection(("127.0.0.1", inst.port), timeout=10))
        inst.wait_bus(lambda s: (s.get("vm", {}).get("connections") or 0) >= 200, 30,
                      "the forwarder to report the 200 silent connections")
        took, out = timed_ssh(inst, GUEST_PROCESSES)
        assert out.returncode == 0, out.stderr
        # and once the silent ones are past their first-word wait (in the silent lane)
        time_after_lane, out2 = timed_ssh(inst, GUEST_PROCESSES)
        assert out2.returncode == 0, out2.stderr
        held = inst.status()["vm"]["connections"]
    finally:
        for s in silent:
            s.close()
    # dropbear's own process, this login's, and the silent lane's holder (one more while a
    # holder that stayed silent is being closed and the next is dialled)
    sessions = [o.stdout.split().count("dropbear") - 2 for o in (out, out2)]
    report("silent200", {"alone_s": [round(a, 3) for a in alone], "baseline_s": round(baseline, 3),
                         "with_200_silent_s": round(took, 3),
                         "with_200_silent_later_s": round(time_after_lane, 3),
                         "silent_sessions_in_guest": sessions})
    # the silent ones were held, not dropped to make room: the lane closes one per SILENT_GRACE
    # at most, so fewer than half can be gone within the two logins' ssh timeouts
    assert held > 100, held
    assert all(0 <= n <= forwarder.SILENT_LANE + 1 for n in sessions), sessions


# -- a frozen hypervisor ----------------------------------------------------------------------


def test_a_frozen_hypervisor_is_reported_and_replaced(shared: Instance) -> None:
    """SIGSTOP of QEMU with a session open: `running` was shown for minutes, new clients hung
    until ssh's own timeout (75-143 s), and log lines had empty reasons."""
    inst = shared
    vm0 = inst.wait_vm("running")
    qemu = inst.qemu()
    assert qemu is not None
    session = Streamer(inst)
    session.wait_lines(3, 60)
    t_freeze = time.monotonic()
    os.kill(qemu.pid, signal.SIGSTOP)
    client: dict[str, Any] = {}

    def new_client() -> None:  # a client arriving while the hypervisor is frozen
        t0 = time.monotonic()
        client["out"] = inst.ssh("cat", "/proc/sys/kernel/random/boot_id", timeout=240)
        client["took"] = time.monotonic() - t0

    thread = threading.Thread(target=new_client)
    thread.start()
    # (the bound ends a hang; how soon it is noticed is reported, not judged on a loaded host)
    inst.wait_bus(lambda s: "vm" in s and (s["vm"].get("state") not in ("running", "paused")
                                           or s["vm"].get("pid") != qemu.pid),
                  120, "the frozen VM to be reported")
    noticed = time.monotonic() - t_freeze
    status = json.loads(inst.cli("status", "--json").stdout)
    st = status["vm"]
    # `failed`, or already booting again for the client that came meanwhile: the cause stays
    assert st["state"] in ("failed", "starting"), st
    assert "the hypervisor stopped answering" in (st.get("reason") or ""), st
    assert "is stopped: SIGSTOP" in st["reason"]
    thread.join(240)
    out = client["out"]
    session.close()
    reason_text = inst.wait_log("vm", "the hypervisor stopped answering")
    report("sigstop", {"noticed_s": round(noticed, 2), "status_state": st["state"],
                       "new_client_s": round(client["took"], 2), "new_client_rc": out.returncode})
    assert "stopped answering" in reason_text and "is stopped" in reason_text
    assert out.returncode == 0, out.stderr  # a recovered VM, not ssh's own timeout
    vm1 = inst.wait_vm("running")
    assert vm1["pid"] != qemu.pid and vm1["boots"] == vm0["boots"] + 1
    # the waiting client was served by the replacement, not by the thawed frozen guest
    now = inst.ssh("cat", "/proc/sys/kernel/random/boot_id")
    assert now.returncode == 0 and out.stdout.strip() == now.stdout.strip(), (out.stdout, now.stdout)
    wait_until(lambda: not qemu.is_running() or qemu.status() == "zombie", 10, "the frozen qemu killed")
    # every log line carries its reason
    for name in ("vm", "forwarder", "idle"):
        text = (Path(inst.config.log_dir) / f"{name}.log").read_text()
        for line in text.splitlines():
            assert not line.rstrip().endswith("failed:"), line
    assert log_lines(inst, "vm", "did not power off") == 0


# -- kill -9 of the vm worker while it saves the VM -------------------------------------------

# what the new worker's log says it found
PATHS = ("in the middle of a save", "recorded the save a previous vm worker finished",
         "after a save failed", "adopted guest proven", "VM saved")


@pytest.mark.parametrize("delays", [(0.0, 0.05, 0.15)])
def test_kill_9_of_the_vm_worker_while_suspending_loses_nothing(guest_dir: Path,
                                                               delays: tuple[float, ...]) -> None:
    """The new worker treated a QEMU in the middle of its save as stopped, killed it without a
    word and deleted the snapshot; the idle monitor then showed `stopping` for 60 s."""
    figures: list[dict[str, Any]] = []
    with Instance(guest_dir=guest_dir, onDemand={"pauseAfter": None, "stopAfter": 3}) as inst:
        inst.start()  # the first round's ssh boots the VM; 3 s after it ends, it is saved
        before: dict[str, int] = {}
        for i, delay in enumerate(delays):
            marker = f"marker-{i}-{time.time_ns()}"
            out = inst.ssh("sh", "-c", f"'echo {marker} > /tmp/marker'")
            assert out.returncode == 0, out.stderr
            if i == 0:
                boots = inst.status()["vm"]["boots"]
            inst.wait_vm("suspending", timeout=60)  # the idle monitor's stop (3 s idle)
            pid = inst.watcher_pid("vm")
            if delay:
                time.sleep(delay)  # not a wait: where in the save the fault lands, on purpose
            os.kill(pid, signal.SIGKILL)
            old = f"{pid}-"
            states = inst.wait_bus(lambda s, old=old: vm_inc(s) != "" and not vm_inc(s).startswith(old),  # type: ignore[misc]
                                   30, "the new vm worker")
            t_new = time.monotonic()
            new_inc = vm_inc(states)

            def idle_recovered(s: dict[str, Any], new_inc: str = new_inc) -> bool:
                idle, vm = s.get("idle") or {}, s.get("vm") or {}
                seen = ((idle.get("peers") or {}).get("vm") or {}).get("inc")
                return seen == new_inc and vm.get("inc") == new_inc and idle.get("vm") == vm.get("state")

            # the event itself; how soon is reported (the bound only ends a hang)
            inst.wait_bus(idle_recovered, 60, "the idle monitor to follow the new vm worker")
            recovered = time.monotonic() - t_new
            vm = inst.wait_vm("suspended", "running", "paused", timeout=90)
            path = {needle: log_lines(inst, "vm", needle) - before.get(needle, 0) for needle in PATHS}
            before = {needle: log_lines(inst, "vm", needle) for needle in PATHS}
            got = inst.ssh("cat", "/tmp/marker")
            assert got.returncode == 0 and got.stdout.strip() == marker, (got.stdout, got.stderr)
            figures.append({"delay_s": delay, "adopted_as": vm["state"], "path": path,
                            "idle_recovered_s": round(recovered, 3)})
        st = inst.status()["vm"]
        assert st["boots"] == boots, "the VM was booted cold: it was lost"
    report("kill9_suspending", {"rounds": figures})


# -- kill -9 of the vm worker while the guest boots -------------------------------------------


def test_kill_9_of_the_vm_worker_while_starting_serves_the_waiting_client(guest_dir: Path) -> None:
    """The new worker published `running` for the half-booted guest without the SSH proof, and
    the waiting client was served only after the forwarder's 7 s request timeout. "Served" is
    the guest's SSH banner reaching a waiting client through the forwarder; a waiting
    `ssh true` must succeed too (its own login is guest time: reported)."""
    with Instance(guest_dir=guest_dir) as inst:
        inst.start()
        inst.wait_vm("stopped")
        done: dict[str, Any] = {}

        def ssh_client() -> None:
            done["ssh"] = inst.ssh("true", timeout=180)
            done["ssh_at"] = time.monotonic()

        def banner_client() -> None:
            done["banner"] = probe_banner(inst.port, timeout=180)
            done["banner_at"] = time.monotonic()

        threads = [threading.Thread(target=ssh_client), threading.Thread(target=banner_client)]
        for thread in threads:
            thread.start()
        vm = inst.wait_bus(lambda s: s.get("vm", {}).get("state") == "starting" and bool(s["vm"].get("pid")),
                           60, "a boot with its qemu started")["vm"]
        qemu_pid = vm["pid"]
        pid = inst.watcher_pid("vm")
        os.kill(pid, signal.SIGKILL)
        old = f"{pid}-"
        states = inst.wait_bus(lambda s: "vm" in s and not vm_inc(s).startswith(old)
                               and s["vm"].get("state") == "running",
                               120, "the new vm worker to have the guest running")
        t_running = time.monotonic()
        for thread in threads:
            thread.join(120)
        out = done["ssh"]
        assert out.returncode == 0, out.stderr
        assert done["banner"][0] == "ok", done["banner"]
        banner_after = done["banner_at"] - t_running
        ssh_after = done["ssh_at"] - t_running
        report("kill9_starting", {"banner_after_running_s": round(banner_after, 3),
                                  "ssh_true_done_after_running_s": round(ssh_after, 3)})
        assert states["vm"]["pid"] == qemu_pid, "the half-booted guest was replaced, not adopted"
        # Served without waiting out the old worker's request: that request ends on the
        # replacement itself (tests/unit/test_bus.py proves it by its reason); how soon after
        # `running` the banner came is reported above, not judged on a loaded host.
        inst.wait_log("vm", "adopted guest proven")  # the clock, the announcement, one SSH login


# -- an edited config + reload ----------------------------------------------------------------


def test_an_edited_memory_is_pending_then_taken_at_the_next_boot(guest_dir: Path) -> None:
    """The workers read the copy made at `virby run`: an edited memory was ignored without a
    word, and the old 512 MiB snapshot restored."""
    with Instance(guest_dir=guest_dir, memory=512) as inst:
        boot(inst)
        qemu = inst.qemu()
        assert qemu is not None and qemu.cmdline()[qemu.cmdline().index("-m") + 1] == "512"
        data = json.loads(inst.config_path.read_text())
        data["memory"] = 640
        inst.config_path.write_text(json.dumps(data))
        out = inst.cli("reload")
        assert "pending (at the VM's next boot): memory: 512 -> 640" in out.stdout, out.stdout
        assert "memory: 512 -> 640" in inst.cli("status").stdout
        assert inst.cli("stop").stdout.strip() == "VM suspended"
        st = json.loads(inst.cli("status", "--json").stdout)["vm"]
        assert st["state"] == "suspended" and "memory: 512 -> 640" in st["config"]["pending"]
        inst.cli("start", timeout=120)
        vm = inst.wait_vm("running")
        qemu = inst.qemu()
        assert qemu is not None and qemu.cmdline()[qemu.cmdline().index("-m") + 1] == "640"
        assert vm["boots"] == 2 and vm["config"]["pending"] == []  # a cold boot: snapshot not used
        mem = inst.ssh("grep", "MemTotal", "/proc/meminfo")
        kib = int(mem.stdout.split()[1])
        assert kib > 560 * 1024, mem.stdout
        inst.wait_log("vm", "the saved VM was not restored")  # the old 512 MiB one
