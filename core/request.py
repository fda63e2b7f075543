"""One request, one reply, over a fresh ZeroMQ DEALER: the one client for both the vm worker's
commands and circusd's control socket. What a request sends, which reply is its own, and when
waiting ends are decided here once; `call` drives it synchronously (the CLI, which must not
import asyncio), workers/bus.py's `exchange` drives the same Request on the workers' event loop.

A fresh socket per call, so a lost reply is never taken for the answer to a later request. The
request is queued until the connection exists; LINGER 0 drops it if nobody ever answers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from virby.core.protocol import BadMessage, decode_reply, encode_request

CHECK_EVERY = 0.05  # how often a waiting call asks `give_up`

GiveUp = Callable[[], "str | None"]  # a reason to stop waiting, or None


class NoAnswer(Exception):
    """No reply in time, or the caller gave up; the text says which."""


@dataclass(frozen=True)
class Request:
    endpoint: str
    frames: list[bytes]
    accept: Callable[[list[bytes]], dict[str, Any] | None]  # the reply, if these frames are ours
    silent: str  # NoAnswer's text when the deadline passes

    def waits(self, timeout: float, give_up: GiveUp | None = None) -> Iterator[float]:
        """How long to poll, again and again, until a reply is taken; raises NoAnswer at the
        deadline, or as soon as `give_up()` returns a reason."""
        deadline = time.monotonic() + timeout
        while True:
            reason = give_up() if give_up is not None else None
            if reason is not None:
                raise NoAnswer(reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(self.silent)
            yield min(remaining, CHECK_EVERY) if give_up is not None else remaining


def poll_ms(seconds: float) -> int:
    return int(seconds * 1000) + 1  # never 0: that would not wait at all


def command_request(endpoint: str, cmd: str, args: dict[str, Any] | None = None, *,
                    silent: str) -> Request:
    """A vm worker command (core/protocol.py's request); its reply is validated."""
    req_id = uuid.uuid4().hex

    def accept(frames: list[bytes]) -> dict[str, Any] | None:
        try:
            reply = decode_reply(frames[-1])
        except BadMessage:
            return None
        return reply if reply["id"] == req_id else None

    return Request(endpoint, [b"", encode_request(cmd, args, req_id)], accept, silent)


def circus_request(endpoint: str, command: str, props: dict[str, Any], *, silent: str) -> Request:
    """One command to circusd's control socket, in the JSON `circusctl` sends."""
    call_id = uuid.uuid4().hex

    def accept(frames: list[bytes]) -> dict[str, Any] | None:
        try:
            reply = json.loads(frames[-1])
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == call_id else None

    body = json.dumps({"command": command, "properties": props, "id": call_id}).encode()
    return Request(endpoint, [body], accept, silent)


def call(req: Request, *, timeout: float, give_up: GiveUp | None = None,
         ctx: zmq.Context[Any] | None = None) -> dict[str, Any]:
    """Send `req` and return its reply, blocking. Raises NoAnswer."""
    sock: zmq.Socket[Any] = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(req.endpoint)
        sock.send_multipart(req.frames)
        for wait in req.waits(timeout, give_up):
            if sock.poll(poll_ms(wait)):
                reply = req.accept(sock.recv_multipart())
                if reply is not None:
                    return reply
        raise AssertionError("unreachable: waits() ends by raising")
    finally:
        sock.close(linger=0)


def command(endpoint: str, cmd: str, args: dict[str, Any] | None = None, *, timeout: float,
            silent: str, give_up: GiveUp | None = None) -> dict[str, Any]:
    return call(command_request(endpoint, cmd, args, silent=silent), timeout=timeout, give_up=give_up)


def circus(endpoint: str, command: str, props: dict[str, Any], *, timeout: float,
           silent: str) -> dict[str, Any]:
    return call(circus_request(endpoint, command, props, silent=silent), timeout=timeout)
