"""A client for vfkit's REST API on a unix socket (`--restful-uri unix://PATH`).

vfkit serves `GET /vm/state` and `POST /vm/state {"state": X}` with X one of Pause, Resume,
Stop (asks the guest) and HardStop. Its handler answers 202 to a POST although its docs say 200,
so both count as success. One short HTTP/1.1 exchange per call with `Connection: close`: the
socket is local and calls are rare, so there is no connection to keep, reuse or leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from virby.workers.backends.base import BackendError

ACTIONS = ("Pause", "Resume", "Stop", "HardStop")

# vfkit reports Virtualization.framework's raw state names. The backend contract knows three
# states, so a transition counts as the state it is heading for.
_STATES = {
    "VirtualMachineStateRunning": "running",
    "VirtualMachineStateStarting": "running",
    "VirtualMachineStateResuming": "running",
    "VirtualMachineStateRestoring": "running",
    "VirtualMachineStatePaused": "paused",
    "VirtualMachineStatePausing": "paused",
    "VirtualMachineStateSaving": "paused",
    "VirtualMachineStateStopped": "stopped",
    "VirtualMachineStateStopping": "stopped",
    "VirtualMachineStateError": "stopped",
}


@dataclass(frozen=True)
class VmState:
    raw: str  # vfkit's name, e.g. "VirtualMachineStateRunning"
    can_pause: bool
    can_resume: bool
    can_stop: bool
    can_hard_stop: bool

    @property
    def state(self) -> str:
        """"running", "paused" or "stopped"."""
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

    async def change_state(self, action: str) -> None:
        """POST one of ACTIONS. vfkit acts on it asynchronously: poll `state()` to see it."""
        if action not in ACTIONS:
            raise ValueError(f"unknown vfkit state change {action!r}")
        await self.request("POST", "/vm/state", {"state": action})

    async def request(self, method: str, path: str, payload: Any = None) -> bytes:
        try:
            return await asyncio.wait_for(self._exchange(method, path, payload), self.timeout)
        except TimeoutError:
            raise BackendError(
                f"vfkit REST {method} {path}: no answer within {self.timeout:g}s "
                f"on {self.socket_path}") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise BackendError(
                f"vfkit REST {method} {path}: cannot connect to {self.socket_path} "
                f"({e.strerror or e}); is vfkit running?") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise BackendError(f"vfkit REST {method} {path}: {e}") from None

    async def _exchange(self, method: str, path: str, payload: Any) -> bytes:
        body = b"" if payload is None else json.dumps(payload).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                f"Accept: application/json\r\nContent-Length: {len(body)}\r\n")
        if payload is not None:
            head += "Content-Type: application/json\r\n"
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        try:
            writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP reply: {status_line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            reply = await _read_body(reader, headers)
        finally:
            writer.close()
        if status not in (200, 202):
            reason = reply.decode("utf-8", "replace").strip()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                reason = str(json.loads(reply)["error"])  # vfkit's errors: {"error": "..."}
            raise BackendError(
                f"vfkit REST {method} {path}: HTTP {status}: {reason or '(no body)'}")
        return reply


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            out += await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
        return out
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()  # Connection: close delimits the body
