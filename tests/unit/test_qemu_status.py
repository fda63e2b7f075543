"""QemuBackend's reading of QEMU's run state, with QMP replaced by a fake (no QEMU)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.unit.test_qemu_argv import backend
from virby.workers.backends.qemu import QemuBackend


def status_of(b: QemuBackend, qemu_status: str) -> str:
    async def execute(cmd: str, timeout: float = 5.0) -> object:
        assert cmd == "query-status"
        return {"status": qemu_status, "running": False}

    b.process.alive = lambda: True  # type: ignore[method-assign]
    b._execute = execute  # type: ignore[method-assign]
    return asyncio.run(b.status())


@pytest.mark.parametrize("qemu_status", ["guest-panicked", "internal-error", "io-error"])
def test_guest_panicked_is_failed(tmp_path: Path, qemu_status: str) -> None:
    b = backend(tmp_path)
    os.makedirs(b.config.log_dir, exist_ok=True)
    with open(b.console_log, "w") as f:
        f.write("[    1.0] booting\n[    2.5] Kernel panic - not syncing: Attempted to kill init!\n")
    assert status_of(b, qemu_status) == "failed"
    assert b.failure is not None and b.failure.startswith(f"qemu reports {qemu_status}; console: ")
    assert b.failure.endswith("Kernel panic - not syncing: Attempted to kill init!")


@pytest.mark.parametrize(("qemu_status", "ours"), [
    ("running", "running"), ("paused", "paused"), ("prelaunch", "paused"),
    ("shutdown", "stopped"), ("postmigrate", "stopped"),
])
def test_run_states(tmp_path: Path, qemu_status: str, ours: str) -> None:
    assert status_of(backend(tmp_path), qemu_status) == ours


@pytest.mark.parametrize(("migration", "run_state", "found"), [
    ("active", "finish-migrate", "saving"),  # a save still copying
    ("device", "paused", "saving"),
    ("completed", "postmigrate", "saving"),  # saved; qemu not yet told to quit
    ("failed", "paused", "failed"),  # the guest is paused with its memory: resume it
    ("completed", "running", None),  # a restore this qemu completed: not a save
    (None, "running", None),
    (None, "paused", None),
])
def test_an_adopted_save_is_told_from_a_restore(tmp_path: Path, migration: str | None, run_state: str,
                                                found: str | None) -> None:
    """Issue 20: the new vm worker took a QEMU in the middle of its save for a stopped one."""
    b = backend(tmp_path)

    async def execute(cmd: str, timeout: float = 5.0) -> object:
        if cmd == "query-migrate":
            return {"status": migration} if migration else {}
        assert cmd == "query-status"
        return {"status": run_state}

    b._execute = execute  # type: ignore[method-assign]
    assert asyncio.run(b.adopted_save()) == found
