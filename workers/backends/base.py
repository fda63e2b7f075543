"""The contract every hypervisor backend meets (qemu, vfkit).

The vm worker owns exactly one backend object and calls it from one asyncio task at a time: the
state machine in `workers/vm.py` serialises every call, so a backend never guards against
concurrent use of itself. A backend owns the hypervisor process it starts (or adopts) and the
control channel to it (QMP, REST); it closes both in `shutdown`/`kill`, and `close` releases the
control channel while leaving the hypervisor running (the worker is being replaced).

Errors: anything the user must act on (a missing kernel, a hypervisor that exits at once, a
guest that never announces) is raised as `BackendError` with a one-line reason; the worker shows
it as the `failed` state. Other exceptions are bugs.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

from virby.core.config import Config
from virby.core.keys import KeyPaths
from virby.core.logtail import tail_lines
from virby.core.protocol import VmState
from virby.core.watchers import LOGS


class BackendError(Exception):
    """A reason the VM cannot be started or controlled, worded for the user."""


def describe(error: BaseException, timeout: float | None = None) -> str:
    """An exception as a reason for a log line: never empty (a TimeoutError has no text)."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"no answer within {timeout:g}s" if timeout is not None else "timed out"
    return str(error).strip() or type(error).__name__


@dataclass(frozen=True)
class Endpoint:
    """Where the guest's sshd is reachable from the host."""

    host: str
    port: int


class Backend(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config: Config, keys: KeyPaths) -> None:
        self.config = config
        self.keys = keys
        self.failure: str | None = None  # why `status` last said FAILED

    # -- files and command line (pure, unit-tested) ------------------------------------------

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BackendError naming the first file the boot needs that is missing or unusable
        (kernel, initrd, hypervisor binary). Called at every boot, never at start-up."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The hypervisor's full argv. Pure: depends only on the config and the files it names."""

    # -- lifecycle -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def boot(self) -> None:
        """Start the hypervisor as a child process and connect its control channel. Returns
        once the process runs; the guest is not ready yet. Writes the pid file."""

    @abc.abstractmethod
    async def wait_announced(self) -> None:
        """Return when the guest says its sshd is listening (its agent, workers/agent.py).
        Raise BackendError if the hypervisor exits first. The caller applies the deadline."""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """The guest's sshd as seen from the host. Valid after boot/adopt."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs; memory stays. Idempotent."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Continue after pause. Idempotent."""

    @abc.abstractmethod
    async def shutdown(self, timeout: float) -> None:
        """Ask the guest to power off; kill the hypervisor if it is still there after `timeout`.
        Returns when the process is gone. Removes the pid file."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the hypervisor now and reap it. Idempotent."""

    @abc.abstractmethod
    async def status(self) -> VmState:
        """The hypervisor's own view: RUNNING, PAUSED, STOPPED, or FAILED when the guest
        is broken while the hypervisor runs on (a panic, an internal or I/O error); then
        `failure` says how, with the console's last lines."""

    async def ping(self, timeout: float) -> None:
        """Raise BackendError unless the hypervisor answers its control channel within
        `timeout` (the vm worker's liveness watch: a hung or SIGSTOPped hypervisor)."""
        try:
            await asyncio.wait_for(self.status(), timeout)
        except TimeoutError as e:
            raise BackendError(f"{self.name} did not answer a status query: "
                               f"{describe(e, timeout)}{self.stopped_hint()}") from e

    def stopped(self) -> bool:
        """The hypervisor's process is alive but stopped (SIGSTOP, a debugger): it answers
        nothing until it is continued, so one missed query says enough."""
        return False

    def stopped_hint(self) -> str:
        """Why the hypervisor may not answer, for a reason's text: stopped, or gone."""
        pid = self.pid()
        if pid is None:
            return f" ({self.name} has exited)"
        return f" ({self.name} pid {pid} is stopped: SIGSTOP or a debugger)" if self.stopped() else ""

    async def wait_broken(self) -> str:
        """Return the reason once the guest breaks while the hypervisor runs on (as `status`
        would say "failed"). The default never returns: a backend that cannot tell relies on
        the hypervisor exiting."""
        await asyncio.Future()
        raise AssertionError("unreachable")

    @abc.abstractmethod
    async def wait_exit(self) -> None:
        """Return when the hypervisor process has exited (for any reason)."""

    @abc.abstractmethod
    async def adopt(self) -> bool:
        """Re-attach to a hypervisor a previous worker left running (pid file + identity check
        of pid, create time and command line, then the control channel). True if adopted;
        False if there is nothing to adopt (stale files are removed)."""

    async def sync_clock(self) -> None:  # noqa: B027 - optional capability
        """Set the guest clock from the host's after a resume. Optional."""

    # -- suspend to disk (optional capability, issue 14) ---------------------------------------

    def can_suspend(self) -> bool:
        """Whether `suspend`/`restore` work for this backend and config. Without it the vm
        worker's suspend is a clean stop (vfkit today: it has no save/restore endpoint yet,
        vfkit#449; VZ itself can save and restore on macOS 14+)."""
        return False

    def snapshot_inputs(self) -> dict[str, str | None]:
        """The files a saved guest depends on (their identity goes into the snapshot record)."""
        from virby.workers.snapshot import default_inputs

        return default_inputs(self.config)

    async def suspend(self, path: str) -> None:
        """Pause the guest, save the whole machine state into the existing empty file `path`,
        and let the hypervisor exit. Returns when the process is gone (pid file removed).
        Raise BackendError if the state could not be saved; the hypervisor is then left as it
        was (the caller shuts it down)."""
        raise BackendError(f"the {self.name} backend cannot save a VM")

    async def restore(self, path: str) -> None:
        """Start the hypervisor from the state saved in `path` and load it; the guest stays
        paused (the caller checks the file, then calls `resume` and `sync_guest`). Raise
        BackendError if the hypervisor refuses the state or exits."""
        raise BackendError(f"the {self.name} backend cannot restore a VM")

    async def adopted_save(self) -> str | None:
        """After `adopt`: whether the hypervisor is in a save a previous worker started:
        "saving" (under way, or done and the hypervisor not yet gone), "failed" (it failed;
        the guest is paused, its memory intact), or None (no save)."""
        return None

    async def finish_suspend(self, timeout: float) -> None:
        """Wait for the save `adopted_save` found to complete, then let the hypervisor exit,
        as `suspend` does. Raise BackendError if it does not complete."""
        raise BackendError(f"the {self.name} backend cannot save a VM")

    async def sync_guest(self, seed: bytes) -> None:
        """After a restore: set the guest clock, mix `seed` into the guest's entropy pool and ask
        the guest to announce sshd again (`wait_announced` then returns). Default: the clock."""
        await self.sync_clock()

    async def close(self) -> None:  # noqa: B027 - optional capability
        """Release the control channel; leave the hypervisor running (for a worker exiting
        while the VM must survive it)."""

    @abc.abstractmethod
    def pid(self) -> int | None:
        """The hypervisor's pid, if it runs."""

    def console_tail(self, lines: int = 15) -> str:
        """The last lines of the guest console log, for failure reasons."""
        return "\n".join(tail_lines(self.console_log, lines))

    @property
    def console_log(self) -> str:
        return os.path.join(self.config.log_dir, LOGS["console"])


# -- helpers shared by backends --------------------------------------------------------------


def require_file(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise BackendError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise BackendError(f"{what} is not readable: {path}")


def require_binary(what: str, name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackendError(f"{what} not found: {name} (not on PATH and not an executable file)")
    return found
