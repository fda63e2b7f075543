"""The unit tier starts no processes: any attempt fails the test that made it (move such a test
to tests/integration)."""

from __future__ import annotations

import os
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a unit test started a process: move it to tests/integration")


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Popen's one way to start a child (subprocess.run, asyncio's subprocesses, click's
    # launchers all end here), and the os calls underneath anything else.
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
                 "execvpe", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse)
