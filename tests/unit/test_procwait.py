"""procwait: the one process-exit wait (no process is started here: the test's own pid is the
process that lives)."""

from __future__ import annotations

import asyncio
import os

from virby.core import procwait


def test_an_exit_before_the_wait_began_is_not_missed() -> None:
    # alive() is asked once the pidfd exists: a process already gone returns at once
    asyncio.run(asyncio.wait_for(procwait.exited(os.getpid(), lambda: False), 10))


def test_a_living_process_is_still_waited_for_at_the_bound() -> None:
    assert procwait.exited_within(os.getpid(), lambda: True, 0.05) is False


def test_a_pid_that_does_not_exist_is_gone_when_alive_says_so() -> None:
    assert procwait.exited_within(2**22 + 1, lambda: False, 10) is True
