"""The supervisor's own failures: circusd killed with a VM running, reloads and SIGHUP that must
never run two VM managers, and a watcher that crashes at start-up backing off."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from testing.harness import Instance
from tests.reliability.conftest import boot
from tests.reliability.support import circus_events, probe_banner, report, wait_exited, wait_until

pytestmark = pytest.mark.reliability


def test_kill_9_of_circusd_with_a_running_vm_frees_everything_and_a_new_run_serves(
        guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir) as inst:
        boot(inst)
        qemu = inst.qemu()
        assert qemu is not None
        watchers = [psutil.Process(inst.watcher_pid(n)) for n in ("vm", "forwarder", "idle")]
        keys_before = (inst.dir / "state" / "ssh_user_ed25519_key").read_bytes()
        t0 = time.monotonic()
        os.kill(inst.circusd_pid(), signal.SIGKILL)
        # Every watcher exits on its own (nothing else ends them), then QEMU goes with the vm
        # worker. The bounds only end a hang: how fast is reported, not judged on a loaded host.
        alive = wait_exited(watchers, 60)
        watchers_gone = time.monotonic() - t0
        assert alive == [], f"watchers still running after circusd died: {alive}"
        alive = wait_exited([qemu], 60)
        qemu_gone = time.monotonic() - t0
        assert alive == [], "QEMU outlived its vm worker"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", inst.port), timeout=2).close()
        assert inst.proc is not None
        inst.proc.wait(5)
        # The same config, the same dirs (with whatever the crash left): a new arbiter serves.
        t1 = time.monotonic()
        boot(inst)
        outcome, _seconds, detail = probe_banner(inst.port)
        assert outcome == "ok", detail
        assert inst.qemu() is not None and inst.qemu().pid != qemu.pid  # type: ignore[union-attr]
        assert (inst.dir / "state" / "ssh_user_ed25519_key").read_bytes() == keys_before
        assert inst.ssh("true").returncode == 0
        report("kill9[circusd]", {"watchers_gone_s": round(watchers_gone, 2),
                                  "qemu_gone_s": round(qemu_gone, 2),
                                  "restart_to_running_s": round(time.monotonic() - t1, 2)})


def _vm_managers(inst: Instance) -> list[int]:
    return [p.pid for p in inst.tree_leftovers()
            if "virby.workers.vm" in " ".join(p.cmdline())]


def test_reload_and_sighup_never_run_two_vm_managers(instance: Instance) -> None:
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": instance.config.endpoint("ctl")}
    vm_pid = instance.watcher_pid("vm")
    idle_pid = instance.watcher_pid("idle")
    seen_counts: list[int] = []
    with circus_events(instance) as events:
        for action in ("reload vm", "reload vm --sequential", "reload", "SIGHUP"):
            reloads = len(events.topics("watcher.vm.reload"))
            if action == "SIGHUP":
                os.kill(instance.circusd_pid(), signal.SIGHUP)
            else:
                out = subprocess.run(["circusctl", *action.split(), "--waiting"], env=env,
                                     capture_output=True, text=True, timeout=60, check=False)
                assert out.returncode == 0, (action, out.stdout, out.stderr)
            # circusd publishes watcher.vm.reload once it has sent the vm its SIGHUP.
            def reloaded(r: int = reloads) -> bool:
                return len(events.topics("watcher.vm.reload")) > r

            wait_until(reloaded, 10, f"watcher.vm.reload after {action}")
            seen_counts.append(len(_vm_managers(instance)))
        # Everything a reload would have done has happened by now: the last action was
        # answered and the bus shows the vm (same incarnation) broadcasting.
        states = instance.wait_bus(lambda s: "vm" in s and "idle" in s, 30, "vm and idle")
    assert states["vm"]["inc"].startswith(f"{vm_pid}-")
    assert states["idle"]["inc"].startswith(f"{idle_pid}-")
    assert instance.watcher_pid("vm") == vm_pid
    assert instance.watcher_pid("idle") == idle_pid
    spawns = [b for _t, tp, b in events.events if tp in ("watcher.vm.spawn", "watcher.idle.spawn")]
    kills = [b for _t, tp, b in events.events if tp in ("watcher.vm.kill", "watcher.idle.kill")]
    assert spawns == [] and kills == [], (spawns, kills)
    assert set(seen_counts) == {1}, seen_counts
    vm_log = (Path(instance.config.log_dir) / "vm.log").read_text()
    # each SIGHUP re-reads the config file (issue 20), never restarts the VM manager
    assert vm_log.count("SIGHUP: re-reading the config") >= 4


def test_a_worker_that_crashes_at_start_backs_off_and_status_says_why(instance: Instance) -> None:
    """Make idle's bus endpoint unusable (a directory where its socket goes), kill idle: each
    new idle fails to bind, records the failure and waits 1 s, 2 s, 4 s ... before exiting."""
    endpoint = Path(instance.config.endpoint("idle.pub").removeprefix("ipc://"))
    endpoint.unlink()  # the running idle keeps its bound socket
    endpoint.mkdir()
    with circus_events(instance) as events:
        t0 = time.monotonic()
        os.kill(instance.watcher_pid("idle"), signal.SIGKILL)
        # 1 s + 2 s + 4 s of backoff plus start-up: the fourth spawn comes after ~8-10 s.
        wait_until(lambda: len(events.topics("watcher.idle.spawn")) >= 4, 30, "4 spawns of idle")
        # circusd's own spawn times, not when our subscriber got the events (which load delays)
        spawns = [float(b["time"]) for _t, b in events.topics("watcher.idle.spawn")]
        window = time.monotonic() - t0
        out = instance.cli("status", "--json")
        failure = json.loads(out.stdout)["watchers"]["idle"].get("failure")
        text = instance.cli("status").stdout
        endpoint.rmdir()
        # Recovery: the next idle binds and is seen by the vm worker.
        instance.wait_bus(lambda s: bool(((s.get("vm") or {}).get("peers") or {}).get("idle", {}).get("up")),
                          90, "idle to come back")
    gaps = [b - a for a, b in itertools.pairwise(spawns)]
    report("crash-backoff[idle]", {"spawn_gaps_s": [round(g, 2) for g in gaps],
                                   "spawns_in_window": len(spawns), "window_s": round(window, 1),
                                   "failure": failure})
    # circus alone would respawn once a second; with the backoff the waits double: each
    # worker says which it keeps, and circusd's spawns are at least that far apart (lower
    # bounds only: a loaded host can lengthen a gap, never shorten one).
    log = (Path(instance.config.log_dir) / "idle.log").read_text()
    waits = re.findall(r"waiting (\d+)s before exiting \(crash backoff\)", log)
    assert waits[:3] == ["1", "2", "4"], waits
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0 and gaps[2] >= 4.0, gaps
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1], gaps
    assert failure is not None and failure["count"] >= 2
    assert "Address already in use" in failure["reason"] or "ZMQError" in failure["reason"], failure
    assert "Address already in use" in text  # the human-readable status shows the reason too
    assert "crash backoff" in log
