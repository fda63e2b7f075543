"""QemuBackend's reading of QEMU's run state and of its agent, with QMP and the agent socket
replaced by fakes (no QEMU)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.unit.test_qemu_argv import backend
from virby.workers.backends.qemu import QemuBackend


def status_of(b: QemuBackend, qemu_status: str) -> str:
    async def execute(cmd: str) -> object:
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


def test_agent_replies_do_not_grow(tmp_path: Path) -> None:
    """The agent answers every resume's `time` command and every `hello`: nothing of it may pile
    up in the backend (it used to be queued and never read)."""
    b = backend(tmp_path)

    async def t() -> None:
        reader = asyncio.StreamReader()
        for _ in range(1000):
            reader.feed_data(b"time set\n")
        reader.feed_data(b"virby-ready\n")
        reader.feed_eof()
        await b._agent_loop(reader)

    before = {k: _size(v) for k, v in vars(b).items()}
    asyncio.run(t())
    after = {k: _size(v) for k, v in vars(b).items()}
    assert b._ready.is_set()
    assert after == before


def _size(value: object) -> int | None:
    if isinstance(value, asyncio.Queue):
        return value.qsize()
    try:
        return len(value)  # type: ignore[arg-type]
    except TypeError:
        return None
