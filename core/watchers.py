"""The one table of per-watcher facts: what circus runs, how long it waits for each worker to
stop, which one holds the listening socket, and the files each leaves (logs, crash record).
The circus ini, the bus names, the CLI's `logs`/`status`/`doctor` and launchd's exit timeout
all read it. Also every other log Virby writes, so `virby logs <name>` knows each one.
"""

from __future__ import annotations

from dataclasses import dataclass

from virby.core.timeouts import FORWARDER_DRAIN_TIMEOUT, VM_SHUTDOWN_TIMEOUT


@dataclass(frozen=True)
class Watcher:
    name: str  # the circus watcher, the bus sender and the worker's log name
    label: str  # what the user reads ("vm worker restarted")
    module: str  # run as `python -m <module>`
    priority: int  # circus starts higher first
    # SIGTERM to SIGKILL: longer than the worker's own stop deadline, so circus never kills a
    # worker still inside it
    graceful_timeout: int
    holds_socket: bool = False  # only one may hold the port: a stray copy keeps it open

    @property
    def command(self) -> str:
        """After the Python interpreter; circus substitutes the socket's fd."""
        fd = " --fd $(circus.sockets.ssh)" if self.holds_socket else ""
        return f"-m {self.module}{fd}"

    @property
    def singleton(self) -> bool:
        """A reload or SIGHUP becomes a SIGHUP the worker ignores, never a second copy. The
        forwarder may run twice while a new one takes over."""
        return not self.holds_socket

    @property
    def log_file(self) -> str:
        return f"{self.name}.log"  # its stderr: the worker's logging

    @property
    def out_file(self) -> str:
        return f"{self.name}.out"  # its stdout

    @property
    def failure_file(self) -> str:
        return f"{self.name}.failure"  # its crash record, in the runtime dir (core/failures.py)


TABLE = (  # in the order the CLI lists them
    Watcher("vm", "vm worker", "virby.workers.vm", 30, VM_SHUTDOWN_TIMEOUT + 15),
    Watcher("forwarder", "forwarder", "virby.workers.forwarder", 20,
            FORWARDER_DRAIN_TIMEOUT + 5, holds_socket=True),
    Watcher("idle", "idle monitor", "virby.workers.idle", 10, 5),
)
BY_NAME = {w.name: w for w in TABLE}
NAMES = tuple(w.name for w in TABLE)
LONGEST_GRACEFUL = max(w.graceful_timeout for w in TABLE)

CIRCUSD_LOG = "circusd.log"
# Every log in the log dir by the name `virby logs` takes: circusd's, each watcher's, the guest
# console (backends/base.py) and each hypervisor's own output (the backend in use writes one).
LOGS = {
    "circusd": CIRCUSD_LOG,
    **{w.name: w.log_file for w in TABLE},
    "console": "console.log",
    "qemu": "qemu.log",
    "vfkit": "vfkit.log",
}
