"""Start QEMU with the backend's command line and reach it: the one direct boot, used by the
backend (`QemuBackend._start`, and `connect` for an adopted QEMU), by the e2e tests and by the
bench's limit (testing/direct.py).

QEMU is spawned in its own session through the backend's HypervisorProcess; its QMP socket is
connected (it appears once QEMU has parsed its command line) and `info usernet` gives the
loopback port QEMU picked for the guest's sshd (`hostfwd=tcp:127.0.0.1:0-:22`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from virby.core.logtail import last_line
from virby.workers.backends.base import BackendError

if TYPE_CHECKING:
    from virby.workers.backends.qemu.backend import QemuBackend

USERNET_RE = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b")
SOCKETS_TIMEOUT = 10.0  # QEMU creates its sockets while it parses its argv: milliseconds


@dataclass
class Control:
    """A started QEMU's QMP connection (the caller disconnects it) and its SSH port."""

    qmp: QMPClient
    port: int


async def start(backend: QemuBackend, extra: Sequence[str] = ()) -> Control:
    """Spawn QEMU with `backend.command()` (+ `extra`) in its own session, with its output in
    the backend's qemu log, and connect to it. The kernel, initrd and disk must be in place.
    Raises BackendError; a QEMU that started is left running for the caller to kill."""
    for path in (backend.qmp_path, backend.agent_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.makedirs(os.path.dirname(backend.qemu_log), exist_ok=True)
    await backend.process.start([*backend.command(), *extra], log_path=backend.qemu_log)
    return await connect(backend)


async def connect(backend: QemuBackend) -> Control:
    """QMP and the forwarded SSH port of the backend's QEMU (started or adopted)."""
    sockets = [backend.qmp_path] + ([backend.agent_path] if backend.agent_on_socket else [])
    deadline = time.monotonic() + SOCKETS_TIMEOUT
    while not all(os.path.exists(p) for p in sockets):
        if not backend.process.alive():
            raise BackendError(f"qemu exited at start: {last_line(backend.qemu_log)}")
        if time.monotonic() > deadline:
            raise BackendError(f"qemu did not create its QMP socket within {SOCKETS_TIMEOUT:g}s")
        await asyncio.sleep(0.005)
    while True:
        qmp = QMPClient("virby-vm")
        try:
            await asyncio.wait_for(qmp.connect(backend.qmp_path), 5)
            break
        except (QMPError, OSError, TimeoutError) as e:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            # the socket files appear at bind(), a moment before listen(): "refused" = not yet
            if "refused" in str(e) and backend.process.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                continue
            raise BackendError(f"cannot connect to QMP at {backend.qmp_path}: {e}") from e
    try:
        return Control(qmp, await forwarded_port(qmp))
    except (BackendError, QMPError, OSError):
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        raise


async def forwarded_port(qmp: QMPClient) -> int:
    out = await qmp.execute("human-monitor-command", {"command-line": "info usernet"})
    m = USERNET_RE.search(str(out))
    if not m:
        raise BackendError(f"no SSH port forward in `info usernet`: {out!r}")
    return int(m.group(1))
