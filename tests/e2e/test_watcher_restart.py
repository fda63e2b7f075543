"""Restarting watchers keeps the VM; stopping the arbiter ends it cleanly (issue 11, defect 2).

A session streams through the forwarder from a real guest while circusctl restarts or reloads
the watchers: it must run to its end, on the same hypervisor, with no new boot and no pause.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from testing.harness import Instance, exited

pytestmark = pytest.mark.e2e

COUNT_TO_12 = "for i in $(seq 12); do echo $i; sleep 1; done"


@pytest.fixture
def vm(guest_dir: Path) -> Iterator[Instance]:
    with Instance(guest_dir=guest_dir) as inst:
        inst.start()
        yield inst


def circusctl(inst: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": inst.config.endpoint("ctl")}
    return subprocess.run(["circusctl", "--timeout", "90", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def vm_log(inst: Instance) -> str:
    return (inst.dir / "state" / "logs" / "vm.log").read_text()


@pytest.mark.parametrize("command", [["restart", "vm", "--waiting"], ["restart"], ["reload", "--waiting"]],
                         ids=["restart-vm", "restart-all", "reload-all"])
def test_circusctl_restart_vm_keeps_guest(vm: Instance, command: list[str]) -> None:
    stream = vm.ssh_popen(COUNT_TO_12, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert stream.stdout is not None
    first = stream.stdout.readline()  # the session is up, through the forwarder
    assert first == b"1\n", stream.stderr.read() if stream.stderr else ""
    before = vm.status()["vm"]
    qemu = vm.qemu()
    assert qemu is not None and before["state"] == "running" and before["boots"] == 1
    old_worker = vm.watcher_pid("vm")

    out = circusctl(vm, *command)
    assert out.returncode == 0, out.stdout + out.stderr

    rest, err = stream.communicate(timeout=120)
    assert stream.returncode == 0, err
    assert rest.decode().split() == [str(i) for i in range(2, 13)]
    restarted = command[0] == "restart"
    try:
        st = vm.wait_bus(lambda s: "vm" in s and s["vm"].get("state") == "running"
                         and s["vm"]["inc"].startswith(f"{old_worker}-") != restarted, 60,
                         "the vm worker (a new one after a restart) with the VM running")["vm"]
    except AssertionError as e:
        raise AssertionError(f"{e}\nvm.log:\n{vm_log(vm)[-6000:]}") from None
    assert st["pid"] == qemu.pid and qemu.is_running()
    assert st["boots"] == 1
    log = vm_log(vm)
    assert "-> paused" not in log and "-> stopping" not in log and "-> starting" in log
    # the one boot, never a second; a new worker proves the guest it adopts (issue 20) while
    # `starting`, without booting it
    adoptions = log.count("-> starting (adopted a running VM")
    assert log.count("-> starting") - adoptions == 1
    assert log.count("adopted guest proven") == adoptions
    assert "cannot watch the guest" not in log  # the QMP event watch ran on every worker
    if restarted:
        assert "keeping the VM" in log and f"adopted running qemu, pid {qemu.pid}" in log
    assert vm.ssh("true").returncode == 0


@pytest.mark.parametrize("how", ["quit", "stop-vm"])
def test_arbiter_stop_shuts_the_guest_down_cleanly(vm: Instance, how: str) -> None:
    assert vm.ssh("true").returncode == 0
    qemu = vm.qemu()
    assert qemu is not None
    out = circusctl(vm, "quit", "--waiting") if how == "quit" else circusctl(vm, "stop", "vm", "--waiting")
    assert out.returncode == 0, out.stdout + out.stderr
    assert exited([qemu], timeout=60) == [], "the hypervisor is still running"
    log = vm_log(vm)
    assert "shutting the VM down" in log
    assert "did not power off" not in log  # a clean ACPI power-off, not a kill
    assert "-> stopping" in log and "stopping -> stopped" in log
    if how == "quit":
        assert vm.proc is not None and vm.proc.wait(30) == 0
    else:
        assert vm.circus("status", name="vm")["status"] == "stopped"
        assert psutil.pid_exists(vm.circusd_pid())
