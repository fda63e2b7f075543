"""The bus: how Virby's processes talk. One module defines the whole protocol.

State is broadcast, commands are requests.

* Every message is two frames: the sender's name (the ZeroMQ topic) and a JSON body
  `{"v": 1, "kind": "state"|"event", "from", "inc", "seq", "t", "data"}`. `inc` is the
  sender's incarnation (pid and start time), `seq` counts its messages, `t` is wall time.
* A `state` message carries the sender's whole current state. Owners send it on every change,
  as a heartbeat every second, and (XPUB owners) to every new subscriber: a missed message is
  healed within a second and no decision depends on one particular message.
* `vm` and `idle` bind an XPUB (`<name>.pub`) and a SUB inbox (`<name>.in`). The forwarder
  binds nothing, because `circusctl reload forwarder` briefly runs two of it: it connects a
  SUB to both XPUBs and a PUB to both inboxes.
* Commands go DEALER -> ROUTER (`vm.ctl`): `{"v": 1, "id", "cmd", "args"}` answered by
  `{"v": 1, "id", "ok", "error"?, "state"?}`. Commands are idempotent; clients time out.

Anything malformed is logged once per sender and reason, then dropped, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq
import zmq.asyncio

from virby.core import request as client
from virby.core.config import Config
from virby.core.protocol import (  # re-exported: the bus's users import them from here
    COMMANDS,
    HEARTBEAT,
    INBOX_OWNERS,
    KINDS,
    MAX_MESSAGE,
    NAMES,
    PEER_TIMEOUT,
    VERSION,
    VM_COMMANDS,
    XPUB_OWNERS,
    BadMessage,
    Message,
    decode,
    decode_request,
    encode_reply,
    encode_request,
    inbox_endpoint,
    state_endpoint,
)

EARLY_BEATS = (0.02, 0.05, 0.1, 0.2, 0.4)
CLOSE_LINGER_MS = 200

log = logging.getLogger("virby.bus")

__all__ = ["COMMANDS", "HEARTBEAT", "INBOX_OWNERS", "KINDS", "MAX_MESSAGE", "NAMES", "PEER_TIMEOUT",
           "VERSION", "XPUB_OWNERS", "BadMessage", "Message", "decode", "decode_request",
           "encode_reply", "encode_request"]


def incarnation() -> str:
    """pid and start time: unique per process, stable for its lifetime."""
    me = psutil.Process()
    return f"{me.pid}-{me.create_time():.3f}"


class _OncePerReason:
    """Log a drop once per (source, reason) so garbage floods don't flood the log."""

    def __init__(self, limit: int = 256) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.limit = limit
        self.dropped = 0

    def __call__(self, source: str, reason: str) -> None:
        self.dropped += 1
        key = (source, reason[:80])
        if key in self.seen or len(self.seen) >= self.limit:
            return
        self.seen.add(key)
        log.warning("dropped a malformed message from %s: %s", source, reason)


@dataclass
class Peer:
    """What we know of another process from its messages."""

    name: str
    inc: str = ""
    seq: int = -1
    last_seen: float = 0.0  # time.monotonic() of the last message
    state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0  # incarnation changes we saw

    @property
    def up(self) -> bool:
        return bool(self.inc) and time.monotonic() - self.last_seen < PEER_TIMEOUT

    def view(self) -> dict[str, Any]:
        return {"inc": self.inc or None, "up": self.up, "seq": self.seq, "restarts": self.restarts,
                "age": round(time.monotonic() - self.last_seen, 3) if self.inc else None}


Handler = Callable[[Message, Peer, bool], Awaitable[None] | None]
StateSource = Callable[[], Mapping[str, Any]]
Reply = tuple[bool, str | None, Mapping[str, Any]]  # ok, error, state


def _ipc_path(endpoint: str) -> str:
    return endpoint.removeprefix("ipc://")


class Node:
    """One process's bus connection: publishes its state, tracks its peers.

    Owns its ZeroMQ sockets and closes them in `close()`. `on_message(msg, peer, restarted)` is
    called for every valid message from a peer; `restarted` is True when the peer's
    incarnation changed (it was restarted).

    The state it publishes is read from a source (`use_state`) at each publish, so it is never
    stale. `changed()` publishes it at once if it differs from the last one sent; it runs after
    every message heard (a peer's news often changes ours). `volatile` keys (a countdown's text)
    do not count as a change: the next heartbeat carries them.
    """

    def __init__(self, name: str, config: Config, on_message: Handler | None = None,
                 ctx: zmq.asyncio.Context | None = None, *, volatile: tuple[str, ...] = ()) -> None:
        assert name in NAMES
        self.name = name
        self.config = config
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.inc = incarnation()
        self.seq = 0
        self._fields: dict[str, Any] = {}
        self._source: StateSource = lambda: self._fields
        self._sent: dict[str, Any] | None = None  # the state last published, volatile keys out
        self.volatile = volatile
        self.peers = {n: Peer(n) for n in NAMES if n != name}
        self.on_message = on_message
        self.drops = _OncePerReason()
        self._socks: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._xpub: zmq.asyncio.Socket | None = None
        self._pub: zmq.asyncio.Socket | None = None

    def _sock(self, kind: int) -> zmq.asyncio.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 20)  # ipc peers come back within milliseconds
        self._socks.append(s)
        return s

    async def start(self) -> None:
        receivers: list[zmq.asyncio.Socket] = []
        if self.name in XPUB_OWNERS:
            self._xpub = self._sock(zmq.XPUB)
            self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every (re)subscription: replay
            self._xpub.setsockopt(zmq.SNDHWM, 1000)
            self._xpub.bind(self.config.endpoint(state_endpoint(self.name)))
            self._tasks.append(asyncio.create_task(self._replay_loop(self._xpub)))
        if self.name in INBOX_OWNERS:
            inbox = self._sock(zmq.SUB)
            inbox.setsockopt(zmq.SUBSCRIBE, b"")
            inbox.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + 1024)
            inbox.bind(self.config.endpoint(inbox_endpoint(self.name)))
            receivers.append(inbox)
        else:
            self._pub = self._sock(zmq.PUB)
            for owner in INBOX_OWNERS:
                self._pub.connect(self.config.endpoint(inbox_endpoint(owner)))
        sub = self._sock(zmq.SUB)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + 1024)
        for owner in XPUB_OWNERS:
            if owner != self.name:
                sub.setsockopt(zmq.SUBSCRIBE, owner.encode())
                sub.connect(self.config.endpoint(state_endpoint(owner)))
        receivers.append(sub)
        for r in receivers:
            self._tasks.append(asyncio.create_task(self._recv_loop(r)))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        self.publish_state()

    def _send(self, msg: Message) -> None:
        frames = msg.encode()
        for s in (self._xpub, self._pub):
            if s is None:
                continue
            # A slow subscriber (zmq.Again): the next heartbeat carries the state again.
            with contextlib.suppress(zmq.Again):
                s.send_multipart(frames, flags=zmq.NOBLOCK)

    def _message(self, kind: str, data: dict[str, Any]) -> Message:
        self.seq += 1
        return Message(kind, self.name, self.inc, self.seq, time.time(), data)

    def use_state(self, source: StateSource) -> None:
        """Publish what `source()` returns from now on."""
        self._source = source

    @property
    def state(self) -> dict[str, Any]:
        """Our state as it is now (what the next publish sends)."""
        return dict(self._source())

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._fields = dict(value)
        self._source = lambda: self._fields

    def _stable(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k not in self.volatile}

    def publish_state(self) -> None:
        state = self.state
        self._sent = self._stable(state)
        # Each state carries the sender's view of its peers: anyone can see who sees whom.
        self._send(self._message("state", {**state, "peers": self.peers_view()}))

    def changed(self) -> None:
        """Publish now if our state changed since it was last sent."""
        if self._stable(self.state) != self._sent:
            self.publish_state()

    def update(self, **changes: Any) -> None:
        """Change our own fields (no `use_state` source) and broadcast them at once."""
        self._fields.update(changes)
        self.changed()

    def event(self, name: str, **data: Any) -> None:
        self._send(self._message("event", {"event": name, **data}))

    async def _heartbeat_loop(self) -> None:
        # A connecting PUB drops what it sends before the connection is up, so beat a few
        # times early: a restarted process is seen within ~50 ms, not a whole heartbeat later.
        for delay in itertools.chain(EARLY_BEATS, itertools.repeat(HEARTBEAT)):
            await asyncio.sleep(delay)
            self.publish_state()

    async def _replay_loop(self, xpub: zmq.asyncio.Socket) -> None:
        while True:
            frame = await xpub.recv()
            if frame[:1] == b"\x01":  # a new subscription: send the last value now
                self.publish_state()

    async def _recv_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as e:  # e.g. a frame over MAXMSGSIZE drops the connection
                self.drops("socket", str(e))
                continue
            try:
                msg = decode(frames)
            except BadMessage as e:
                self.drops(frames[0][:32].decode("ascii", "replace") if frames else "?", str(e))
                continue
            if msg.sender == self.name:
                continue  # another copy of us (forwarder reload): not a peer
            await self._accept(msg)

    async def _accept(self, msg: Message) -> None:
        peer = self.peers[msg.sender]
        restarted = bool(peer.inc) and msg.inc != peer.inc
        first_seen = not peer.inc
        if msg.inc == peer.inc and msg.seq <= peer.seq and msg.kind == "state":
            return  # stale or duplicate
        if restarted:
            peer.restarts += 1
            log.info("%s restarted: incarnation %s -> %s", msg.sender, peer.inc, msg.inc)
        elif not peer.inc:
            log.info("%s seen: incarnation %s", msg.sender, msg.inc)
        peer.inc, peer.seq, peer.last_seen = msg.inc, msg.seq, time.monotonic()
        if msg.kind == "state":
            peer.state = msg.data
        if restarted or first_seen:
            self.publish_state()  # let everyone see our updated view of our peers now
        if self.on_message is not None:
            result = self.on_message(msg, peer, restarted)
            if result is not None:
                await result
        self.changed()

    def peers_view(self) -> dict[str, Any]:
        return {n: p.view() for n, p in self.peers.items()}

    async def close(self) -> None:
        self.changed()  # a last change (the vm's `stopped` as the arbiter stops) goes out
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._socks:
            # Our last state (e.g. the vm's `stopped` as the arbiter stops) still goes out.
            s.close(linger=CLOSE_LINGER_MS if s in (self._xpub, self._pub) else 0)


class ControlServer:
    """The vm worker's ROUTER. `handle(cmd, args)` returns (ok, error, state)."""

    def __init__(self, config: Config,
                 handle: Callable[[str, dict[str, Any]], Awaitable[Reply]],
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE + 1024)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.handle = handle
        self.drops = _OncePerReason()
        self.endpoint = config.endpoint(VM_COMMANDS)
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.sock.bind(self.endpoint)
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except zmq.ZMQError as e:
                self.drops("control", str(e))
                continue
            if len(frames) < 2:
                self.drops("control", "request without an envelope")
                continue
            ident, body = frames[0], frames[-1]
            try:
                req_id, cmd, args = decode_request(body)
            except BadMessage as e:
                self.drops("control", str(e))
                continue
            # Each request gets its own task: a `wake` that waits for a boot must not hold up
            # a `status` sent meanwhile. The handler itself serialises state changes.
            task = asyncio.create_task(self._answer(ident, req_id, cmd, args))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _answer(self, ident: bytes, req_id: str, cmd: str, args: dict[str, Any]) -> None:
        try:
            ok, error, state = await self.handle(cmd, args)
        except Exception as e:  # a bug in a handler must not take the control socket down
            log.exception("command %s failed", cmd)
            ok, error, state = False, f"internal error: {e}", {}
        await self.sock.send_multipart([ident, b"", encode_reply(req_id, ok, error=error, state=state)])

    async def close(self) -> None:
        for t in [self._task, *self._pending]:
            if t is not None:
                t.cancel()
        self.sock.close(linger=0)


class RequestError(Exception):
    """A command did not get an answer, or got an error answer."""


async def exchange(req: client.Request, *, timeout: float, give_up: client.GiveUp | None = None,
                   ctx: zmq.asyncio.Context | None = None) -> dict[str, Any]:
    """core/request.py's Request, driven on the event loop: the same frames, the same reply
    check, the same deadline and give-up rule as the CLI's blocking `call`. Raises NoAnswer."""
    sock = (ctx or zmq.asyncio.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(req.endpoint)
        await sock.send_multipart(req.frames)
        for wait in req.waits(timeout, give_up):
            if await sock.poll(client.poll_ms(wait)):
                reply = req.accept(await sock.recv_multipart())
                if reply is not None:
                    return reply
        raise AssertionError("unreachable: waits() ends by raising")
    finally:
        sock.close(linger=0)


async def request(config: Config, cmd: str, args: dict[str, Any] | None = None, *,
                  timeout: float = 2.0, ctx: zmq.asyncio.Context | None = None,
                  peer: Peer | None = None) -> dict[str, Any]:
    """Send one command to the vm worker and wait for its reply.

    With `peer` (the caller's view of the vm worker), the request ends at once with
    RequestError when the worker's incarnation changes while it waits: the worker that took
    it is gone and will never answer (a kill -9 mid-request), and the new one is ready for
    the caller's next request."""
    inc0 = peer.inc if peer is not None else ""

    def replaced() -> str | None:
        if peer is not None and peer.inc != inc0:
            return (f"the vm worker was replaced while it handled {cmd} "
                    f"(incarnation {inc0} -> {peer.inc}); not answered")
        return None

    req = client.command_request(config.endpoint(VM_COMMANDS), cmd, args,
                                 silent=f"no answer from the vm worker within {timeout:g}s ({cmd})")
    try:
        return await exchange(req, timeout=timeout, give_up=replaced if inc0 else None, ctx=ctx)
    except client.NoAnswer as e:
        raise RequestError(str(e)) from None


def remove_stale_ipc(config: Config, names: list[str]) -> None:
    """libzmq re-binds over an existing ipc file, but a dangling one confuses `ls`-level
    debugging; remove what a crashed process left."""
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_ipc_path(config.endpoint(n)))
