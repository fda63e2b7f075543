"""Progress for the waits a person sits through: `virby start`, and `virby ssh`/`virby forward`
on a VM that is not running yet.

On a terminal a spinner line with the elapsed time is redrawn in place; otherwise (a pipe, a
log file, CI) a plain line is written when the VM changes state and every PLAIN_EVERY seconds,
so logs stay readable. Progress goes to stderr: stdout stays the command's own output.

The wait itself follows the vm worker's broadcasts (every change, and a heartbeat each second),
never a poll of `status`.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from virby.core.config import Config
from virby.core.protocol import (
    FAILED,
    PAUSED,
    PROVING,
    RESTORING,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    SUSPENDED,
    SUSPENDING,
    BadMessage,
    VmStateData,
    as_vm_state,
    decode,
)
from virby.supervisor import control

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
TICK = 0.1
PLAIN_EVERY = 10.0
REKICK_EVERY = 1.0


class StartFailed(Exception):
    """The VM did not become ready; the text is the reason, worded for the user."""


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _ascii_only(stream: TextIO) -> bool:
    enc = (getattr(stream, "encoding", None) or "ascii").lower()
    return "utf" not in enc


class Progress:
    """One line of progress on `stream`: spinner on a TTY, plain lines otherwise."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = _is_tty(stream) if tty is None else tty
        self.frames = "|/-\\" if _ascii_only(stream) else FRAMES
        self.t0 = time.monotonic()
        self.i = 0
        self.message = ""
        self.last_plain = 0.0
        self.drawn = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def update(self, message: str) -> None:
        """Show `message`; plain mode prints it only when it changed (or every PLAIN_EVERY s)."""
        changed = message != self.message
        self.message = message
        if self.tty:
            self.i += 1
            frame = self.frames[self.i % len(self.frames)]
            self.stream.write(f"\r\033[K{frame} {message} {self.elapsed:.1f}s")
            self.drawn = True
        elif changed or self.elapsed - self.last_plain >= PLAIN_EVERY:
            self.last_plain = self.elapsed
            self.stream.write(f"virby: {message} ({self.elapsed:.0f}s)\n")
        self.stream.flush()

    def done(self, message: str | None = None) -> None:
        if self.tty and self.drawn:
            self.stream.write("\r\033[K")
        if message:
            self.stream.write(f"virby: {message}\n")
        self.stream.flush()


WAITING_WORDS: dict[str, str] = {
    STOPPED: "asking the VM to boot",
    STARTING: "booting the VM (cold start)",
    PAUSED: "resuming the VM",
    STOPPING: "waiting for the VM to finish stopping, then booting it again",
    SUSPENDING: "waiting for the VM to finish saving, then restoring it",
    SUSPENDED: "asking the VM to restore",
    FAILED: "the last boot failed; trying again",
}
PHASE_WORDS: dict[str, str] = {  # while starting
    RESTORING: "restoring the saved VM",
    PROVING: "checking the running VM before use",
}


def _words(state: VmStateData) -> str:
    current = state.get("state", STARTING)
    phase = state.get("phase")
    if current == STARTING and phase in PHASE_WORDS:
        return PHASE_WORDS[phase]
    return WAITING_WORDS.get(current, f"waiting for the VM ({current})")


def wait_running(config: Config, progress: Progress, timeout: float | None = None) -> dict[str, Any]:
    """Ask the vm worker to start the VM (it answers at once) and follow its broadcasts until it
    is `running`. Returns the vm state. Raises StartFailed with the reason, control.NotRunning
    when there is no arbiter."""
    timeout = timeout if timeout is not None else config.readyTimeout + 30
    reply = control.request(config, "start", {"wait": 0}, timeout=5)
    state = as_vm_state(reply.get("state") or {})
    if reply["ok"] and state.get("state") == RUNNING:
        return dict(state)
    if not reply["ok"] and reply.get("error") and state.get("state") == FAILED:
        raise StartFailed(str(reply["error"]))
    sock = control.subscribe(config)
    last_kick = time.monotonic()
    current = state.get("state", STARTING)
    booting = current == STARTING  # a `failed` after this is our boot failing
    try:
        deadline = time.monotonic() + timeout
        while True:
            progress.update(_words(state))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartFailed(f"the VM is not running after {timeout:.0f}s (it is {current}); "
                                  "see `virby logs vm` and `virby logs console`")
            if not sock.poll(int(min(TICK, remaining) * 1000) + 1):
                continue
            try:
                msg = decode(sock.recv_multipart())
            except BadMessage:
                continue
            if msg.sender != "vm" or msg.kind != "state":
                continue
            state = as_vm_state(msg.data)
            current = state.get("state", STARTING)
            if current == RUNNING:
                return dict(msg.data)
            if current == STARTING:
                booting = True
            elif current == FAILED and booting:
                raise StartFailed(state.get("reason") or "the boot failed")
            elif (current in (STOPPED, SUSPENDED, PAUSED, FAILED)
                  and time.monotonic() - last_kick >= REKICK_EVERY):
                # A stop finished, or our start raced one: ask again (wake is idempotent).
                last_kick = time.monotonic()
                reply = control.request(config, "start", {"wait": 0}, timeout=5)
                st = as_vm_state(reply.get("state") or {})
                if not reply["ok"] and reply.get("error") and st.get("state") == FAILED:
                    raise StartFailed(str(reply["error"]))
    finally:
        sock.close(linger=0)
