"""Waiting for a process to exit, from async or sync code: one implementation.

On Linux a pidfd turns readable when the process exits, so the wait costs no wake-ups while it
lives; elsewhere (macOS) `alive` is polled.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

POLL = 0.2  # seconds between looks where there is no pidfd


async def exited(pid: int, alive: Callable[[], bool]) -> None:
    """Return once process `pid` has exited. `alive()` says whether it still runs and is still
    the process meant (pid reuse); it is asked after the pidfd exists, so an exit just before
    it is not missed."""
    pidfd_open = getattr(os, "pidfd_open", None)
    fd = -1
    if pidfd_open is not None:
        try:
            fd = pidfd_open(pid)
        except OSError:
            fd = -1  # gone already (alive() says so) or no pidfd here: poll
    if fd < 0:
        while alive():
            await asyncio.sleep(POLL)
        return
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        if alive():
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def exited_within(pid: int, alive: Callable[[], bool], seconds: float) -> bool:
    """`exited` for code without an event loop: True if the process exited within `seconds`."""

    async def bounded() -> bool:
        try:
            await asyncio.wait_for(exited(pid, alive), seconds)
            return True
        except TimeoutError:
            return False

    return asyncio.run(bounded())
