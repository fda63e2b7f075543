"""The hypervisor process, for any backend: start it as our child, record who it is, find it
again after the worker restarts (adopt), wait for it, kill it.

Resource handling: a HypervisorProcess owns one process and its pid record (a JSON file with
pid, create time and command line). It starts the process in its own session, so a signal to
the worker's process group never reaches the VM, and a kill -9 of the worker leaves it running
for the next worker to adopt. `kill()` ends the process; `forget()` drops the record. The
backend owns the control channel (QMP, REST) and calls these around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from virby.core import procwait
from virby.core.files import write_json
from virby.workers.backends.base import BackendError


@dataclass(frozen=True)
class PidRecord:
    """What we write next to a hypervisor we start, to recognise it after our own restart."""

    pid: int
    create_time: float
    argv: Sequence[str]

    def save(self, path: str) -> None:
        write_json(path, {"pid": self.pid, "create_time": self.create_time, "argv": list(self.argv)})

    @classmethod
    def load(cls, path: str) -> PidRecord | None:
        try:
            with open(path) as f:
                data = json.load(f)
            return cls(int(data["pid"]), float(data["create_time"]), list(data["argv"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive_process(self) -> psutil.Process | None:
        """The process if it is still the one we started (pid reuse is ruled out by create
        time and command line), else None."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.05:
                return None
            if proc.cmdline() != list(self.argv):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


class HypervisorProcess:
    def __init__(self, name: str, pid_path: str) -> None:
        self.name = name
        self.pid_path = pid_path
        self.child: asyncio.subprocess.Process | None = None  # set when we started it
        self.proc: psutil.Process | None = None  # set while there is a process to watch

    async def start(self, argv: Sequence[str], *, log_path: str, cwd: str | None = None) -> None:
        """Exec `argv` with stdout and stderr appended to `log_path`, and write the pid record.
        Raises BackendError if it cannot be started. A process that dies at once is not an
        error here: `alive()` says so and the backend reports why."""
        with open(log_path, "ab") as out:
            try:
                self.child = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd,
                    start_new_session=True)
            except OSError as e:
                raise BackendError(f"cannot start {self.name} ({argv[0]}): {e.strerror or e}") from None
        try:
            self.proc = psutil.Process(self.child.pid)
            # Record what psutil will compare at adoption (a script shows its interpreter).
            PidRecord(self.child.pid, self.proc.create_time(), self.proc.cmdline() or list(argv)
                      ).save(self.pid_path)
        except psutil.Error:
            self.proc = None  # it died already

    def adopt(self) -> bool:
        """Take over the process a previous worker recorded, if it is still that process.
        A stale record is removed."""
        record = PidRecord.load(self.pid_path)
        proc = record.alive_process() if record is not None else None
        self.child = None
        self.proc = proc
        if proc is None:
            self.forget()
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.alive() else None

    @property
    def returncode(self) -> int | None:
        return self.child.returncode if self.child is not None else None

    def alive(self) -> bool:
        if self.child is not None and self.child.returncode is not None:
            return False
        if self.proc is None:
            return False
        try:
            return self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def stopped(self) -> bool:
        """The process is alive but stopped (SIGSTOP, a debugger): it runs nothing."""
        if self.proc is None:
            return False
        try:
            return self.proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        except psutil.Error:
            return False

    def send_signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                self.proc.send_signal(sig)

    async def wait_exit(self) -> None:
        """Return when the process has exited: our child via asyncio, an adopted one through
        procwait."""
        if self.child is not None:
            await self.child.wait()
            return
        if self.proc is None:
            return
        await procwait.exited(self.proc.pid, self.alive)

    async def exits_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.wait_exit(), seconds)
            return True
        except TimeoutError:
            return False

    async def kill(self) -> None:
        """SIGKILL and reap. Idempotent; the pid record stays until `forget()`."""
        if self.alive():
            self.send_signal(signal.SIGKILL)
            await self.wait_exit()

    def forget(self) -> None:
        """The process is gone (or no longer ours): drop it and its pid record."""
        self.child = None
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_path)
