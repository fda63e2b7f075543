"""How the arbiter stops, for real: circusd, the three watchers and a hypervisor that never
becomes ready (a stand-in process that only sleeps: the boot stays in `starting`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from testing.harness import Instance, exited

pytestmark = pytest.mark.integration


@pytest.fixture
def booting(tmp_path: Path) -> Iterator[Instance]:
    """An instance whose boots hang: its 'hypervisor' sleeps and never opens a QMP socket."""
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"")
    hv = tmp_path / "sleepy-hypervisor"
    hv.write_text("#!/bin/sh\nexec sleep 600\n")
    hv.chmod(0o755)
    with Instance(guest_dir=tmp_path, hypervisor=str(hv)) as inst:
        inst.start()
        yield inst


def test_stop_during_boot_is_quick(booting: Instance) -> None:
    """One client connects to an on-demand arbiter and leaves at once; SIGTERM to `virby run`
    follows while the guest is still starting. The guest is killed at once, the client is not
    waited for, and circusd exits well within the forwarder's 30 s drain budget."""
    with socket.create_connection(("127.0.0.1", booting.port), timeout=5):
        pass  # the client leaves at once
    vm = booting.wait_bus(lambda s: s.get("vm", {}).get("state") == "starting" and bool(s["vm"].get("pid")),
                          10, "a boot under way with its hypervisor running")["vm"]
    sleeper = [psutil.Process(vm["pid"])]
    assert sleeper[0].name() == "sleep"
    assert booting.proc is not None
    booting.proc.send_signal(signal.SIGTERM)
    # An event (the process exit) with a deadline far below the 30 s it used to take.
    assert booting.proc.wait(15) == 0
    assert exited(sleeper, timeout=5) == []
    logs = booting.dir / "state" / "logs"
    assert "boot cancelled" in (logs / "vm.log").read_text()
    assert "closed: the VM is stopping with the arbiter" in (logs / "forwarder.log").read_text()


def circusctl(inst: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": inst.config.endpoint("ctl")}
    return subprocess.run(["circusctl", "--timeout", "60", *args], env=env, capture_output=True,
                          text=True, timeout=90, check=False)


@pytest.mark.parametrize(("args", "decision"), [
    (["restart", "vm", "--waiting"], "circusd runs watcher_restart: keeping the VM"),
    (["stop", "vm", "--waiting"], "circusd runs watcher_stop: shutting the VM down"),
    (["restart"], "circusd restarts all watchers (`circusctl restart`): keeping the VM"),
    (["quit", "--waiting"], "circusd runs arbiter_stop: shutting the VM down"),
], ids=["restart-vm", "stop-vm", "restart-all", "quit"])
def test_the_vm_worker_tells_a_restart_from_a_stop(instance: Instance, args: list[str],
                                                   decision: str) -> None:
    old = instance.watcher_pid("vm")
    worker = psutil.Process(old)
    out = circusctl(instance, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert exited([worker], timeout=30) == []
    log = (instance.dir / "state" / "logs" / "vm.log").read_text()
    assert f"vm[{old}] INFO stopping: {decision}" in log
    if args[0] == "restart":
        # circusd finishes the restart it was asked for before the teardown stops it (a SIGTERM
        # in the middle of a restart leaves circusd hanging until the teardown's 60 s kill)
        instance.wait_bus(lambda s: _new_worker_with_peers_up(s, old), 60,
                          "the new vm worker, with the forwarder and the idle monitor up")


def _new_worker_with_peers_up(states: dict[str, Any], old: int) -> bool:
    vm = states.get("vm") or {}
    peers = vm.get("peers") or {}
    return (not str(vm.get("inc", f"{old}-")).startswith(f"{old}-")
            and all((peers.get(name) or {}).get("up") for name in ("forwarder", "idle")))
