"""`virby start/stop/pause` talk to the vm worker through control.request: synchronous, the
protocol's encode_request/decode_reply over a plain DEALER, no asyncio and no bus import.
Real ZeroMQ ipc sockets in a temp dir; the worker side is the real ControlServer in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from virby.core import protocol, request
from virby.core.config import Config, from_dict
from virby.supervisor import control
from virby.workers import bus


@pytest.fixture
def config() -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="vctl", dir="/tmp") as d:
        c = from_dict({"runtimeDir": d, "stateDir": d})
        # control.request first checks that an arbiter is there: its control socket file.
        Path(c.endpoint(protocol.CIRCUS_CONTROL).removeprefix("ipc://")).touch()
        yield c


@contextlib.contextmanager
def vm_worker(config: Config) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The vm worker's real ROUTER (bus.ControlServer) on its own event loop in a thread."""
    seen: list[tuple[str, dict[str, Any]]] = []
    ready, stop_set = threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def handle(cmd: str, args: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        seen.append((cmd, args))
        if cmd == "pause":
            return False, "the VM is not running", {"state": "stopped"}
        return True, None, {"state": "running"}

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        server = bus.ControlServer(config, handle, ctx=ctx)
        server.start()
        ready.set()
        await stop.wait()
        await server.close()
        ctx.term()
        stop_set.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield seen
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()
        assert stop_set.is_set()


def test_a_command_gets_the_workers_reply(config: Config) -> None:
    with vm_worker(config) as seen:
        reply = control.request(config, "start", {"wait": 0}, timeout=5)
        refused = control.request(config, "pause", timeout=5)
    assert reply["ok"] is True and reply["state"] == {"state": "running"}
    assert (refused["ok"], refused["error"]) == (False, "the VM is not running")
    assert seen == [("start", {"wait": 0}), ("pause", {})]


def test_stale_and_malformed_replies_are_skipped(config: Config) -> None:
    """Only the reply carrying our request id is ours; anything else on the socket is not."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(config.endpoint(protocol.VM_COMMANDS))

    def answer() -> None:
        ident, empty, body = router.recv_multipart()
        req_id = json.loads(body)["id"]
        for junk in (b"not json", protocol.encode_reply("someone-else", True),
                     json.dumps({"v": 99, "id": req_id, "ok": True}).encode()):
            router.send_multipart([ident, empty, junk])
        router.send_multipart([ident, empty, protocol.encode_reply(req_id, True, state={"n": 1})])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        reply = control.request(config, "status", timeout=5)
    finally:
        thread.join(5)
        router.close()
        ctx.term()
    assert reply["ok"] is True and reply["state"] == {"n": 1}


def test_no_vm_worker_is_a_one_line_not_running(config: Config) -> None:
    with pytest.raises(control.NotRunning, match=r"the vm worker does not answer: .*within 0.2s \(stop\)"):
        control.request(config, "stop", timeout=0.2)


def test_no_arbiter_says_how_to_start_it(tmp_path: Path) -> None:
    c = from_dict({"runtimeDir": str(tmp_path), "stateDir": str(tmp_path)})
    with pytest.raises(control.NotRunning, match=r"virby is not running: .*start it with `virby run`"):
        control.request(c, "status", timeout=0.2)


@pytest.mark.parametrize(("body", "reason"), [
    (b"[]", "is not an object"),
    (b"\xff", "not JSON"),
    (json.dumps({"v": 1, "ok": True}).encode(), "without an id or ok"),
    (json.dumps({"v": 1, "id": "x", "ok": "yes"}).encode(), "without an id or ok"),
    (b" " * (protocol.MAX_MESSAGE + 1), "too large"),
    (json.dumps({"v": 1, "id": "x", "ok": True, "error": 3}).encode(), "'error'"),
    (json.dumps({"v": 1, "id": "x", "ok": True, "state": []}).encode(), "'state'"),
    (json.dumps({"v": 1, "id": "x", "ok": True, "state": {"state": "asleep"}}).encode(),
     "reply state: field 'state'"),
])
def test_decode_reply_rejects_what_is_not_a_reply(body: bytes, reason: str) -> None:
    with pytest.raises(protocol.BadMessage, match=reason):
        protocol.decode_reply(body)


def test_a_circus_command_takes_only_the_answer_to_its_own_id(config: Config) -> None:
    """circusd's JSON: the same client, another reply format; stale answers are skipped."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = config.endpoint("test-ctl")
    router.bind(endpoint)

    def answer() -> None:
        ident, body = router.recv_multipart()
        question = json.loads(body)
        router.send_multipart([ident, json.dumps({"id": "older", "status": "ok"}).encode()])
        router.send_multipart([ident, b"{"])
        router.send_multipart([ident, json.dumps({"id": question["id"], "status": "error",
                                                  "reason": question["command"]}).encode()])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        reply = request.circus(endpoint, "add", {"name": "vm"}, timeout=5, silent="silent")
    finally:
        thread.join(5)
        router.close()
        ctx.term()
    assert (reply["status"], reply["reason"]) == ("error", "add")


def test_a_waiting_request_ends_when_its_caller_gives_up(config: Config) -> None:
    """Nobody answers, and the deadline is far: the caller's reason ends the wait."""
    asked = []

    def give_up() -> str | None:
        asked.append(1)
        return "the worker was replaced" if len(asked) >= 3 else None

    with pytest.raises(request.NoAnswer, match="the worker was replaced"):
        request.command(config.endpoint(protocol.VM_COMMANDS), "stop", timeout=3600, silent="silent",
                        give_up=give_up)
    assert len(asked) == 3
