"""The bus protocol as data: message and request formats, validated on receipt. No sockets, no
asyncio here, so the CLI can read the bus cheaply; workers/bus.py moves these over ZeroMQ.

* Every broadcast is two frames: the sender's name (the ZeroMQ topic) and a JSON body
  `{"v": 1, "kind": "state"|"event", "from", "inc", "seq", "t", "data"}`. `inc` is the
  sender's incarnation (pid and start time), `seq` counts its messages, `t` is wall time.
* Commands: `{"v": 1, "id", "cmd", "args"}` answered by `{"v": 1, "id", "ok", "error"?,
  "state"?}`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

VERSION = 1
KINDS = ("state", "event")
COMMANDS = ("wake", "start", "stop", "pause", "resume", "status")
HEARTBEAT = 1.0
PEER_TIMEOUT = 3 * HEARTBEAT + 0.5  # three missed heartbeats: the peer is down
MAX_MESSAGE = 64 * 1024

# -- names: the one table of processes, sockets and runtime files -------------------------------
# Every user of a name (circus ini, bus, CLI, runtime-dir clean-up) takes it from here.
# The watchers' own facts are in their table; imported here to keep this block self-contained.
from virby.core import watchers  # noqa: E402

WATCHERS = watchers.NAMES  # circus watchers, in the order the CLI lists them (core/watchers.py)
NAMES = WATCHERS  # every watcher is also a bus sender
# Who binds what: state owners bind, the forwarder (which may run twice) only connects.
XPUB_OWNERS = ("vm", "idle")
INBOX_OWNERS = ("vm", "idle")

# ZeroMQ endpoints: `Config.endpoint(name)` is `ipc://<runtimeDir>/<name>.sock`.
CIRCUS_CONTROL = "ctl"  # circusd's control socket (what circusctl talks to)
CIRCUS_EVENTS = "events"  # circusd's pub/sub of watcher events
VM_COMMANDS = "vm.ctl"  # DEALER -> ROUTER commands to the vm worker


def state_endpoint(owner: str) -> str:
    """The XPUB a state owner broadcasts on."""
    return f"{owner}.pub"


def inbox_endpoint(owner: str) -> str:
    """The SUB inbox a state owner hears others' broadcasts on."""
    return f"{owner}.in"


ENDPOINTS = (CIRCUS_CONTROL, CIRCUS_EVENTS, VM_COMMANDS,
             *(state_endpoint(o) for o in XPUB_OWNERS), *(inbox_endpoint(o) for o in INBOX_OWNERS))


def failure_file(watcher: str) -> str:
    """The crash record a watcher leaves in the runtime dir (core/failures.py)."""
    return watchers.BY_NAME[watcher].failure_file


COUNTERS_FILE = "vm.counters.json"  # boot counters that outlive a vm worker restart

# What a previous arbiter leaves that must not mislead the next one. The hypervisor's own
# sockets and pid file are not here: a VM may still run, and the vm worker adopts or cleans it.
STALE_RUNTIME_FILES = (*(f"{e}.sock" for e in ENDPOINTS), *(failure_file(w) for w in WATCHERS),
                       COUNTERS_FILE)


class BadMessage(ValueError):
    """A message that does not follow the protocol; the text says how."""


@dataclass(frozen=True)
class Message:
    kind: str
    sender: str
    inc: str
    seq: int
    t: float
    data: dict[str, Any]

    def encode(self) -> list[bytes]:
        body = {"v": VERSION, "kind": self.kind, "from": self.sender, "inc": self.inc,
                "seq": self.seq, "t": self.t, "data": self.data}
        return [self.sender.encode(), json.dumps(body, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> Message:
    """Validate two frames from the wire. Raises BadMessage with the reason."""
    if len(frames) != 2:
        raise BadMessage(f"expected 2 frames, got {len(frames)}")
    topic, body = frames
    if len(body) > MAX_MESSAGE:
        raise BadMessage(f"message of {len(body)} bytes is over {MAX_MESSAGE}")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadMessage("body is not an object")
    if obj.get("v") != VERSION:
        raise BadMessage(f"unsupported version {obj.get('v')!r}")
    sender, kind, inc, seq, t, data = (obj.get(k) for k in ("from", "kind", "inc", "seq", "t", "data"))
    if sender not in NAMES or topic != str(sender).encode():
        raise BadMessage(f"unknown sender {sender!r} (topic {topic[:32]!r})")
    if kind not in KINDS:
        raise BadMessage(f"unknown kind {kind!r}")
    if not isinstance(inc, str) or not 0 < len(inc) <= 64:
        raise BadMessage("bad incarnation")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise BadMessage("bad sequence number")
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise BadMessage("bad time")
    if not isinstance(data, dict):
        raise BadMessage("data is not an object")
    return Message(kind, sender, inc, seq, float(t), data)


def encode_request(cmd: str, args: dict[str, Any] | None = None, req_id: str | None = None) -> bytes:
    return json.dumps({"v": VERSION, "id": req_id or uuid.uuid4().hex, "cmd": cmd,
                       "args": args or {}}).encode()


def decode_request(body: bytes) -> tuple[str, str, dict[str, Any]]:
    if len(body) > MAX_MESSAGE:
        raise BadMessage("request too large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"request not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise BadMessage("request without a supported version")
    req_id, cmd, args = obj.get("id"), obj.get("cmd"), obj.get("args", {})
    if not isinstance(req_id, str) or not 0 < len(req_id) <= 64:
        raise BadMessage("request without an id")
    if cmd not in COMMANDS:
        raise BadMessage(f"unknown command {cmd!r}")
    if not isinstance(args, dict):
        raise BadMessage("request args is not an object")
    return req_id, cmd, args


def decode_reply(body: bytes) -> dict[str, Any]:
    """A reply to a command, validated: `id` and `ok` are there. Raises BadMessage."""
    if len(body) > MAX_MESSAGE:
        raise BadMessage("reply too large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"reply not JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise BadMessage("reply without a supported version")
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("ok"), bool):
        raise BadMessage("reply without an id or ok")
    return obj


def encode_reply(req_id: str, ok: bool, *, error: str | None = None,
                 state: dict[str, Any] | None = None) -> bytes:
    reply: dict[str, Any] = {"v": VERSION, "id": req_id, "ok": ok}
    if error is not None:
        reply["error"] = error
    if state is not None:
        reply["state"] = state
    return json.dumps(reply).encode()
