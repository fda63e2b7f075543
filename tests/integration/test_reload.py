"""Issue 20 without a VM: an edited config is re-read (`virby reload`, `circusctl reload`),
taken, or refused with a message; and the start race between two `virby run`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from testing.harness import Instance

pytestmark = pytest.mark.integration


def edit(inst: Instance, **changes: object) -> None:
    data = json.loads(inst.config_path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    inst.config_path.write_text(json.dumps(data))


def test_an_edited_idle_policy_is_taken_by_circusctl_reload() -> None:
    with Instance(guest_dir=None) as inst:
        inst.start()
        edit(inst, onDemand={"pauseAfter": 7, "stopAfter": 9})
        inst.circus("reload", waiting=True)
        inst.wait_log("idle", "config change taken: onDemand.pauseAfter: 600.0 -> 7.0")
        inst.wait_log("vm", "config change taken: onDemand.stopAfter: 1200.0 -> 9.0")


def test_a_port_change_is_refused_with_a_message() -> None:
    with Instance(guest_dir=None) as inst:
        inst.start()
        old = inst.port
        edit(inst, port=old + 1, memory=640)
        out = inst.cli("reload", check=False)
        assert out.returncode == 1
        assert "reload refused" in out.stderr and f"port {old} -> {old + 1}" in out.stderr
        # circusctl reload cannot be refused before it happens: the workers refuse the key,
        # take the rest, and `virby status` says so
        inst.circus("reload", waiting=True)
        st = inst.wait_bus(lambda s: bool((s.get("vm", {}).get("config") or {}).get("refused")),
                           10, "the refusal in the vm worker's state")["vm"]
        assert st["config"]["refused"][0].startswith(f"port: {old} -> {old + 1}")
        text = inst.cli("status").stdout
        assert "refused: port" in text
        assert inst.status()["watchers"]["forwarder"]["status"] == "active"


def test_virby_reload_reports_what_it_took() -> None:
    with Instance(guest_dir=None) as inst:
        inst.start()
        edit(inst, readyTimeout=33)
        out = inst.cli("reload")
        assert out.stdout.strip().endswith("reloaded"), out.stdout
        inst.wait_log("vm", "config change taken: readyTimeout: 60.0 -> 33.0")


def test_two_runs_at_once_the_loser_says_already_running() -> None:
    """Issue 20: the loser of two `virby run` started at the same instant exited with circus's
    misleading "pid file ... is stale"."""
    with Instance(guest_dir=None) as inst:
        argv = [sys.executable, "-m", "virby.supervisor.cli", "run", "--config", str(inst.config_path)]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
                 for _ in range(2)]
        try:
            deadline = time.monotonic() + 30
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            losers = [p for p in procs if p.poll() is not None]
            assert len(losers) == 1, [p.poll() for p in procs]
            err = losers[0].communicate(timeout=5)[1].decode()
            assert losers[0].returncode == 1, err
            assert "virby is already running for this config" in err, err
            assert "stale" not in err
            winner = next(p for p in procs if p is not losers[0])
            inst.proc = winner
            inst.wait_bus(lambda s: "vm" in s and "idle" in s, 20, "the winner's workers")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(60)
