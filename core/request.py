"""One request, one reply, over a fresh ZeroMQ DEALER: the one client for both the vm worker's
commands and circusd's control socket, used by the CLI (synchronously) and by the workers (in
a thread, see workers/bus.py). Synchronous on purpose: the CLI must not import asyncio.

A fresh socket per call, so a lost reply is never taken for the answer to a later request. The
request is queued until the connection exists; LINGER 0 drops it if nobody ever answers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from virby.core.protocol import BadMessage, decode_reply, encode_request

CHECK_EVERY = 0.05  # how often a waiting call asks `give_up`


class NoAnswer(Exception):
    """No reply in time, or the caller gave up; the text says which."""


Accept = Callable[[list[bytes]], "dict[str, Any] | None"]


def call(endpoint: str, frames: list[bytes], accept: Accept, *, timeout: float, silent: str,
         give_up: Callable[[], str | None] | None = None,
         ctx: zmq.Context[Any] | None = None) -> dict[str, Any]:
    """Send `frames` and return the first reply `accept` takes. NoAnswer(silent) after
    `timeout`; NoAnswer(reason) as soon as `give_up()` returns a reason."""
    sock: zmq.Socket[Any] = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while True:
            reason = give_up() if give_up is not None else None
            if reason is not None:
                raise NoAnswer(reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(silent)
            wait = min(remaining, CHECK_EVERY) if give_up is not None else remaining
            if not sock.poll(int(wait * 1000) + 1):
                continue
            reply = accept(sock.recv_multipart())
            if reply is not None:
                return reply
    finally:
        sock.close(linger=0)


def command(endpoint: str, cmd: str, args: dict[str, Any] | None = None, *, timeout: float,
            silent: str, give_up: Callable[[], str | None] | None = None,
            ctx: zmq.Context[Any] | None = None) -> dict[str, Any]:
    """A vm worker command (core/protocol.py's request) and its validated reply."""
    req_id = uuid.uuid4().hex

    def accept(frames: list[bytes]) -> dict[str, Any] | None:
        try:
            reply = decode_reply(frames[-1])
        except BadMessage:
            return None
        return reply if reply["id"] == req_id else None

    return call(endpoint, [b"", encode_request(cmd, args, req_id)], accept, timeout=timeout,
                silent=silent, give_up=give_up, ctx=ctx)


def circus(endpoint: str, command: str, props: dict[str, Any], *, timeout: float, silent: str,
           ctx: zmq.Context[Any] | None = None) -> dict[str, Any]:
    """One command to circusd's control socket, in the JSON `circusctl` sends."""
    call_id = uuid.uuid4().hex

    def accept(frames: list[bytes]) -> dict[str, Any] | None:
        try:
            reply = json.loads(frames[-1])
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == call_id else None

    body = json.dumps({"command": command, "properties": props, "id": call_id}).encode()
    return call(endpoint, [body], accept, timeout=timeout, silent=silent, ctx=ctx)
