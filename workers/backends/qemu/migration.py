"""Saving and loading a QEMU machine through QMP migration to and from a file.

QEMU 7.2 (the host's) has no `file:` migration URI (that came in 8.2), so the file is opened
here and handed over with SCM_RIGHTS (`getfd`), then used as `fd:NAME` on both sides: no shell,
no `cat` process, no quoting of paths. Measured here (TCG, 512 MiB guest, 106 MB of state):
save 0.1-0.2 s, load 0.1-0.2 s.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from virby.workers.backends.base import BackendError, describe

FD_NAME = "virby-snapshot"
POLL = 0.02
_UNLIMITED = 1 << 40  # bytes/s: the default cap (128 MiB/s) would slow a save of a big guest


async def _call(qmp: QMPClient, cmd: str, args: dict[str, object] | None = None,
                timeout: float = 10) -> object:
    try:
        return await asyncio.wait_for(qmp.execute(cmd, args), timeout)
    except (QMPError, OSError, TimeoutError) as e:
        raise BackendError(f"QMP {cmd} failed: {describe(e, timeout)}") from e


async def _pass_fd(qmp: QMPClient, path: str, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        qmp.send_fd_scm(fd)  # travels with the next command
        await _call(qmp, "getfd", {"fdname": FD_NAME})
    finally:
        os.close(fd)


async def _wait_done(qmp: QMPClient, what: str, deadline: float,
                     alive: Callable[[], bool]) -> dict[str, object]:
    while True:
        if not alive():
            raise BackendError(f"qemu exited during the {what}")
        reply = await _call(qmp, "query-migrate", timeout=max(1.0, deadline - time.monotonic()))
        status = reply.get("status") if isinstance(reply, dict) else None
        if status == "completed":
            return reply if isinstance(reply, dict) else {}
        if status in ("failed", "cancelled"):
            detail = reply.get("error-desc") if isinstance(reply, dict) else None
            raise BackendError(f"the {what} {status}: {detail or 'no reason given'}")
        if time.monotonic() > deadline:
            raise BackendError(f"the {what} did not finish in time (status {status})")
        await asyncio.sleep(POLL)


async def save(qmp: QMPClient, path: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Stop the vCPUs and write the whole machine state into `path` (an existing file).
    QEMU is left in `postmigrate`; on failure the guest stays paused."""
    await _call(qmp, "stop")
    await _call(qmp, "migrate-set-parameters", {"max-bandwidth": _UNLIMITED})
    await _pass_fd(qmp, path, os.O_WRONLY | os.O_TRUNC)
    await _call(qmp, "migrate", {"uri": f"fd:{FD_NAME}"})
    await _wait_done(qmp, "save", time.monotonic() + timeout, alive)


async def wait_saved(qmp: QMPClient, timeout: float, alive: Callable[[], bool]) -> None:
    """Wait for a save already under way (started by a previous vm worker) to complete."""
    await _wait_done(qmp, "save", time.monotonic() + timeout, alive)


async def load(qmp: QMPClient, path: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Load `path` into a QEMU started with `-incoming defer`. The guest stays paused. QEMU
    exits by itself when the state does not load (a damaged or truncated file)."""
    await _pass_fd(qmp, path, os.O_RDONLY)
    await _call(qmp, "migrate-incoming", {"uri": f"fd:{FD_NAME}"})
    await _wait_done(qmp, "restore", time.monotonic() + timeout, alive)
