"""The bus protocol as data: message and request formats, validated on receipt. No sockets, no
asyncio here, so the CLI can read the bus cheaply; workers/bus.py moves these over ZeroMQ.

* Every broadcast is two frames: the sender's name (the ZeroMQ topic) and a JSON body
  `{"v": 1, "kind": "state"|"event", "from", "inc", "seq", "t", "data"}`. `inc` is the
  sender's incarnation (pid and start time), `seq` counts its messages, `t` is wall time.
* Commands: `{"v": 1, "id", "cmd", "args"}` answered by `{"v": 1, "id", "ok", "error"?,
  "state"?}`.
* `data` is typed per sender and kind (VmStateData, IdleStateData, ForwarderStateData,
  EventData below) and checked on receipt, as a reply's `state` is: consumers read fields
  whose types are known, and compare states and codes, never sentences.
"""

from __future__ import annotations

import functools
import json
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import (
    Any,
    Final,
    Literal,
    TypedDict,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

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


# -- the vm worker's states ---------------------------------------------------------------------
# Every other module names a state through these constants, so a typo is a mypy error, not a
# state nobody ever matches.

VmState = Literal["stopped", "starting", "running", "paused", "stopping", "suspending", "suspended",
                  "failed"]
STOPPED: Final = "stopped"
STARTING: Final = "starting"
RUNNING: Final = "running"
PAUSED: Final = "paused"
STOPPING: Final = "stopping"
SUSPENDING: Final = "suspending"
SUSPENDED: Final = "suspended"
FAILED: Final = "failed"
VM_STATES: tuple[VmState, ...] = get_args(VmState)
UNKNOWN: Final = "unknown"  # what the CLI shows when no vm worker answers (never published)

# Which state may follow which. A new vm worker adopts whatever its predecessor left, so the
# first state it publishes is not checked; a repeated state (a new reason) always may.
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset({RUNNING, FAILED, STOPPED, STOPPING}),
    RUNNING: frozenset({PAUSED, STOPPING, SUSPENDING, FAILED, STOPPED}),
    PAUSED: frozenset({RUNNING, STOPPING, SUSPENDING, FAILED, STOPPED}),
    STOPPING: frozenset({STOPPED, FAILED}),
    SUSPENDING: frozenset({SUSPENDED, STOPPED, STARTING, FAILED}),  # starting: the save failed
    SUSPENDED: frozenset({STARTING, STOPPED}),
    FAILED: frozenset({STARTING}),
}


def legal(before: VmState, after: VmState) -> bool:
    return after == before or after in TRANSITIONS[before]


# While `starting`: what the boot is doing, for progress lines (None in every other state).
BootPhase = Literal["booting", "restoring", "proving"]
BOOTING: Final = "booting"  # a cold boot
RESTORING: Final = "restoring"  # loading the saved VM
PROVING: Final = "proving"  # an adopted or resumed guest, proven before use
BOOT_PHASES: tuple[BootPhase, ...] = get_args(BootPhase)

# The idle monitor's decision, as a code; its `decision` text is for people.
IdleCode = Literal["off", "vm-not-up", "busy", "stop-due", "pause-due", "no-stage", "counting-down"]


# -- message data ---------------------------------------------------------------------------------
# Every key is optional on the wire (a fresh worker has not said everything yet); a key that is
# there has the type below, else `decode` refuses the message, naming the key. Unknown keys pass.

Number = int | float


class VmStateData(TypedDict, total=False):
    state: VmState
    phase: BootPhase | None
    since: Number
    reason: str | None
    backend: str
    pid: int | None
    endpoint: list[Any] | None  # [host, port] while running or paused
    boots: int
    last_boot_seconds: Number | None
    restores: int
    last_restore_seconds: Number | None
    snapshot: dict[str, Any] | None
    can_suspend: bool
    woken_at: Number
    retry_at: Number | None
    connections: int
    last_activity: Number
    forwarders: int
    on_demand: bool
    forwarder: ForwarderStateData  # the forwarder's latest state, relayed
    config: dict[str, Any]
    peers: dict[str, Any]


class IdleStateData(TypedDict, total=False):
    enabled: bool
    vm: VmState | None
    connections: int
    idle_since: Number
    pause_at: Number | None
    stop_at: Number | None
    decision_code: IdleCode
    decision: str
    peers: dict[str, Any]


class ForwarderStateData(TypedDict, total=False):
    open: int
    waiting: int
    accepted: int
    failed: int  # clients closed before the VM was ready
    last_activity: Number
    peers: dict[str, Any]


class EventData(TypedDict, total=False):
    event: str  # idle: "pause" | "stop" (requests it made); forwarder: "open" | "close"
    idle_since: Number
    conn: int
    open: int


def as_vm_state(data: dict[str, Any]) -> VmStateData:
    """A vm worker's state (a broadcast's or a reply's data, checked by `decode`), typed."""
    return cast(VmStateData, data)


def as_idle_state(data: dict[str, Any]) -> IdleStateData:
    return cast(IdleStateData, data)


def as_forwarder_state(data: dict[str, Any]) -> ForwarderStateData:
    return cast(ForwarderStateData, data)


STATE_DATA: dict[str, type] = {"vm": VmStateData, "idle": IdleStateData,
                               "forwarder": ForwarderStateData}


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value has the type `tp` (the few kinds the TypedDicts above use)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if is_typeddict(tp):  # a nested message part: an object whose known keys fit too
        return isinstance(value, dict) and all(
            k not in value or _fits(value[k], ktp) for k, ktp in _fields(tp).items())
    if isinstance(value, bool):  # JSON true is no number
        return tp is bool
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, origin or tp)


@functools.cache
def _fields(schema: type) -> dict[str, Any]:
    assert is_typeddict(schema)
    return get_type_hints(schema)


def check_data(data: dict[str, Any], schema: type, what: str) -> None:
    """Raise BadMessage naming the first key of `data` whose value `schema` does not allow."""
    for key, tp in _fields(schema).items():
        if key in data and not _fits(data[key], tp):
            raise BadMessage(f"{what}: field {key!r} has a bad value {str(data[key])[:40]!r}")


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


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    """A message's, request's or reply's body: at most MAX_MESSAGE bytes of JSON, an object of
    our version. Raises BadMessage saying which rule it broke."""
    if len(body) > MAX_MESSAGE:
        raise BadMessage(f"{what} of {len(body)} bytes is too large (over {MAX_MESSAGE})")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadMessage(f"{what} not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadMessage(f"{what} is not an object")
    if obj.get("v") != VERSION:
        raise BadMessage(f"{what} of unsupported version {obj.get('v')!r}")
    return obj


def decode(frames: list[bytes]) -> Message:
    """Validate two frames from the wire. Raises BadMessage with the reason."""
    if len(frames) != 2:
        raise BadMessage(f"expected 2 frames, got {len(frames)}")
    topic, body = frames
    obj = _json_object(body, "message")
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
    check_data(data, STATE_DATA[sender] if kind == "state" else EventData, f"{sender} {kind}")
    return Message(kind, sender, inc, seq, float(t), data)


def encode_request(cmd: str, args: dict[str, Any] | None = None, req_id: str | None = None) -> bytes:
    return json.dumps({"v": VERSION, "id": req_id or uuid.uuid4().hex, "cmd": cmd,
                       "args": args or {}}).encode()


def decode_request(body: bytes) -> tuple[str, str, dict[str, Any]]:
    obj = _json_object(body, "request")
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
    obj = _json_object(body, "reply")
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("ok"), bool):
        raise BadMessage("reply without an id or ok")
    if "error" in obj and not isinstance(obj["error"], str | None):
        raise BadMessage("reply: field 'error' is not text")
    state = obj.get("state")
    if state is not None:
        if not isinstance(state, dict):
            raise BadMessage("reply: field 'state' is not an object")
        check_data(state, VmStateData, "reply state")
    return obj


def encode_reply(req_id: str, ok: bool, *, error: str | None = None,
                 state: Mapping[str, Any] | None = None) -> bytes:
    reply: dict[str, Any] = {"v": VERSION, "id": req_id, "ok": ok}
    if error is not None:
        reply["error"] = error
    if state is not None:
        reply["state"] = dict(state)
    return json.dumps(reply).encode()
