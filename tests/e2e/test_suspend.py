"""Suspend to disk (issue 14), end to end: a real QEMU guest saved at stopAfter, restored by the
next connection; snapshots that must not be restored give a cold boot that still serves it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from testing.harness import Instance
from tests.e2e import guestclock
from virby.core.config import from_dict

pytestmark = pytest.mark.e2e


def snapshot_dir(inst: Instance) -> Path:
    return inst.dir / "state" / "snapshot"


def snapshot_files(inst: Instance) -> list[str]:
    d = snapshot_dir(inst)
    return sorted(os.listdir(d)) if d.exists() else []


def vm_log(inst: Instance) -> str:
    return (inst.dir / "state" / "logs" / "vm.log").read_text()


def ok(inst: Instance, out: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout; on failure, the reason with the vm worker's last log lines."""
    assert out.returncode == 0, f"{out.stderr}\nvm.log:\n{vm_log(inst)[-3000:]}"
    return out.stdout


def status_json(inst: Instance) -> dict:
    return json.loads(inst.cli("status", "--json").stdout)["vm"]


def test_idle_suspends_and_the_next_connection_is_served_by_the_restored_guest(guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir, onDemand={"pauseAfter": None, "stopAfter": 3}) as inst:
        inst.start()
        token = secrets.token_hex(8)
        uptime_before = float(ok(inst, inst.ssh(f"echo {token} > /tmp/marker && cut -d' ' -f1 /proc/uptime")))
        qemu = inst.qemu()
        assert qemu is not None

        st = inst.wait_vm("suspended", timeout=60)
        gone, _ = psutil.wait_procs([qemu], timeout=10)
        assert gone, "the hypervisor is still there after the suspend"
        assert inst.qemu() is None
        assert st["snapshot"]["size"] > 1 << 20
        shown = status_json(inst)
        assert shown["state"] == "suspended" and shown["boots"] == 1 and shown["restores"] == 0
        assert shown["snapshot"]["size"] == os.path.getsize(snapshot_dir(inst) / "vm.state")
        assert "saved VM" in inst.cli("status").stdout
        assert stat.S_IMODE(os.stat(snapshot_dir(inst)).st_mode) == 0o700
        for name in ("vm.state", "vm.json"):
            assert stat.S_IMODE(os.stat(snapshot_dir(inst) / name).st_mode) == 0o600

        # the next client is served by the same guest, restored: its /tmp and its uptime
        marker, uptime_after = ok(inst, inst.ssh("cat /tmp/marker && cut -d' ' -f1 /proc/uptime")).split()
        assert marker == token
        assert float(uptime_after) > uptime_before
        # hold a session so that the idle stop waits while we look
        session = inst.ssh_popen("read line", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            st = status_json(inst)
            assert st["state"] == "running"
            assert st["restores"] == 1 and st["boots"] == 1
            assert st["snapshot"] is None
            assert snapshot_files(inst) == []  # restored at most once: the file went at the restore
            guestclock.wait_confirmed(inst)
            now = guestclock.read(inst)
            assert abs(now.off) <= 1.0, f"{now} after the restore\n{guestclock.clock_lines(inst)}"
        finally:
            session.communicate(b"\n", timeout=30)
        assert "guest restored in" in vm_log(inst)


def test_a_truncated_or_damaged_snapshot_gives_a_cold_boot_that_serves_the_client(guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir, onDemand={"pauseAfter": None, "stopAfter": None}) as inst:
        inst.start()
        ok(inst, inst.ssh("true"))
        assert inst.cli("stop").stdout.strip() == "VM suspended"
        state = snapshot_dir(inst) / "vm.state"
        with open(state, "r+b") as f:
            f.truncate(os.path.getsize(state) // 2)
        assert ok(inst, inst.ssh("echo", "served")).strip() == "served"
        st = status_json(inst)
        assert (st["boots"], st["restores"]) == (2, 0), vm_log(inst)[-3000:]
        assert "the snapshot is truncated or damaged" in vm_log(inst)
        assert snapshot_files(inst) == []

        # same size, one byte changed in the middle of the memory image: the sha256 catches it
        assert inst.cli("stop").stdout.strip() == "VM suspended", vm_log(inst)[-3000:]
        with open(state, "r+b") as f:
            f.seek(os.path.getsize(state) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert ok(inst, inst.ssh("echo", "served")).strip() == "served"
        st = status_json(inst)
        assert (st["boots"], st["restores"]) == (3, 0), vm_log(inst)[-3000:]
        assert "the snapshot is damaged" in vm_log(inst), vm_log(inst)[-3000:]
        assert snapshot_files(inst) == []

        # stop --cold: no snapshot, and `stopped` means exactly that
        qemu = inst.qemu()
        assert inst.cli("stop", "--cold").stdout.strip() == "VM stopped"
        assert qemu is not None and not psutil.wait_procs([qemu], timeout=10)[1]
        assert snapshot_files(inst) == []


def test_a_changed_config_gives_a_cold_boot_that_serves_the_client(guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir, onDemand={"pauseAfter": None, "stopAfter": None}) as inst:
        inst.start()
        ok(inst, inst.ssh("true"))
        assert inst.cli("stop").stdout.strip() == "VM suspended"
        # restart Virby with another config; the state dir (and the snapshot) stay
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGTERM)
        inst.proc.wait(60)
        data = json.loads(inst.config_path.read_text())
        data["onDemand"]["pauseAfter"] = 900
        inst.config_path.write_text(json.dumps(data))
        inst.config = from_dict(data, source=str(inst.config_path))
        inst.start()
        assert inst.wait_vm("suspended", timeout=10)["state"] == "suspended"
        assert ok(inst, inst.ssh("echo", "served")).strip() == "served"
        assert "the saved VM was not restored (the config changed)" in vm_log(inst)
        st = status_json(inst)
        assert st["restores"] == 0 and st["state"] == "running"
        assert snapshot_files(inst) == []
