"""A client for vfkit's REST API on a unix socket (`--restful-uri unix://PATH`).

vfkit serves `GET /vm/state` and `POST /vm/state {"state": X}` with X one of Pause, Resume,
Stop (asks the guest) and HardStop, and `GET /vm/inspect`: the VM's configuration as vfkit's
JSON, where a `virtio-serial,pty` device carries the host pty vfkit made for it (`ptyName`).
Its handler answers 202 to a POST although its docs say 200, so both count as success. One
short HTTP/1.1 exchange per call with `Connection: close`: the socket is local and calls are
rare, so there is no connection to keep, reuse or leak.

HTTP itself is the stdlib's `http.client` (status line, headers, chunked bodies) over a unix
socket; the exchange is blocking, so it runs in a worker thread with a socket timeout and an
overall deadline, and the event loop keeps answering wakes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

from virby.core.protocol import PAUSED, RUNNING, STOPPED
from virby.core.protocol import VmState as HvState
from virby.workers.backends.base import BackendError

ACTIONS = ("Pause", "Resume", "Stop", "HardStop")

# vfkit reports Virtualization.framework's raw state names. The backend contract knows three
# states, so a transition counts as the state it is heading for.
_STATES: dict[str, HvState] = {
    "VirtualMachineStateRunning": RUNNING,
    "VirtualMachineStateStarting": RUNNING,
    "VirtualMachineStateResuming": RUNNING,
    "VirtualMachineStateRestoring": RUNNING,
    "VirtualMachineStatePaused": PAUSED,
    "VirtualMachineStatePausing": PAUSED,
    "VirtualMachineStateSaving": PAUSED,
    "VirtualMachineStateStopped": STOPPED,
    "VirtualMachineStateStopping": STOPPED,
    "VirtualMachineStateError": STOPPED,
}


@dataclass(frozen=True)
class VmState:
    raw: str  # vfkit's name, e.g. "VirtualMachineStateRunning"
    can_pause: bool
    can_resume: bool
    can_stop: bool
    can_hard_stop: bool

    @property
    def state(self) -> HvState:
        """RUNNING, PAUSED or STOPPED."""
        try:
            return _STATES[self.raw]
        except KeyError:
            raise BackendError(f"vfkit reported an unknown VM state: {self.raw!r}") from None


class VfkitRest:
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def state(self) -> VmState:
        body = await self.request("GET", "/vm/state")
        try:
            data = json.loads(body)
            return VmState(
                raw=str(data["state"]),
                can_pause=bool(data.get("canPause", False)),
                can_resume=bool(data.get("canResume", False)),
                can_stop=bool(data.get("canStop", False)),
                can_hard_stop=bool(data.get("canHardStop", False)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"vfkit REST: unreadable /vm/state reply {body[:200]!r}") from e

    async def agent_pty(self) -> str:
        """The host pty of the VM's `virtio-serial,pty` device (the guest agent's port)."""
        body = await self.request("GET", "/vm/inspect")
        try:
            devices = json.loads(body).get("devices") or []
            ptys = [str(d["ptyName"]) for d in devices
                    if d.get("kind") == "virtioserial" and d.get("usesPty") and d.get("ptyName")]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BackendError(f"vfkit REST: unreadable /vm/inspect reply {body[:200]!r}") from e
        if len(ptys) != 1:
            raise BackendError(f"vfkit REST: /vm/inspect names {len(ptys)} virtio-serial ptys, "
                               f"expected the agent's one: {body[:300]!r}")
        return ptys[0]

    async def change_state(self, action: str) -> None:
        """POST one of ACTIONS. vfkit acts on it asynchronously: poll `state()` to see it."""
        if action not in ACTIONS:
            raise ValueError(f"unknown vfkit state change {action!r}")
        await self.request("POST", "/vm/state", {"state": action})

    async def request(self, method: str, path: str, payload: Any = None) -> bytes:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._exchange, method, path, payload), self.timeout)
        except TimeoutError:
            raise BackendError(
                f"vfkit REST {method} {path}: no answer within {self.timeout:g}s "
                f"on {self.socket_path}") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise BackendError(
                f"vfkit REST {method} {path}: cannot connect to {self.socket_path} "
                f"({e.strerror or e}); is vfkit running?") from None
        except http.client.BadStatusLine as e:
            raise BackendError(f"vfkit REST {method} {path}: not an HTTP reply: {e}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise BackendError(f"vfkit REST {method} {path}: {e or type(e).__name__}") from None

    def _exchange(self, method: str, path: str, payload: Any) -> bytes:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Connection": "close", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            status, reply = response.status, response.read()
        finally:
            conn.close()
        if status not in (200, 202):
            reason = reply.decode("utf-8", "replace").strip()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                reason = str(json.loads(reply)["error"])  # vfkit's errors: {"error": "..."}
            raise BackendError(
                f"vfkit REST {method} {path}: HTTP {status}: {reason or '(no body)'}")
        return reply


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client's connection over a unix socket (vfkit's `--restful-uri unix://PATH`)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
