"""vfkit's REST client against in-process servers: the state names, a missing or refusing
socket, a server that never answers, a chunked reply and garbage. The client against a stand-in
vfkit process, and the backend's lifecycle, are in tests/integration/test_vfkit_backend.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virby.workers.backends.base import BackendError
from virby.workers.backends.vfkit.rest import VfkitRest, VmState


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay short (104 bytes on macOS, 108 here)."""
    d = tempfile.mkdtemp(prefix="vfk", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# -- the REST client against in-process servers ------------------------------------------------


@pytest.mark.parametrize(("raw", "mapped"), [
    ("VirtualMachineStateRunning", "running"),
    ("VirtualMachineStateStarting", "running"),
    ("VirtualMachineStateResuming", "running"),
    ("VirtualMachineStatePaused", "paused"),
    ("VirtualMachineStatePausing", "paused"),
    ("VirtualMachineStateStopped", "stopped"),
    ("VirtualMachineStateStopping", "stopped"),
    ("VirtualMachineStateError", "stopped"),
])
def test_state_mapping(raw: str, mapped: str) -> None:
    assert VmState(raw, False, False, False, False).state == mapped


def test_unknown_state_name_is_an_error() -> None:
    with pytest.raises(BackendError, match="unknown VM state: 'VirtualMachineStateDancing'"):
        _ = VmState("VirtualMachineStateDancing", False, False, False, False).state


def test_missing_socket_says_so(short_dir: Path) -> None:
    client = VfkitRest(str(short_dir / "absent.sock"))
    with pytest.raises(BackendError, match=r"cannot connect to .*absent.sock .*is vfkit running"):
        asyncio.run(client.state())


def test_refused_connection_says_so(short_dir: Path) -> None:
    import socket

    path = str(short_dir / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(BackendError, match="cannot connect to"):
            asyncio.run(VfkitRest(path).state())
    finally:
        s.close()


def _serve(path: str, handler):
    """Run `handler` for each connection to an asyncio unix server while `body` runs. Since
    Python 3.12 a server's close waits for its handlers, so those still running when `body`
    ends are cancelled (and their connections closed) first."""
    async def run(body):
        handlers: set[asyncio.Task] = set()

        async def tracked(reader, writer):
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_unix_server(tracked, path=path)
        try:
            return await body()
        finally:
            server.close()
            for task in handlers:
                task.cancel()
            await asyncio.wait_for(server.wait_closed(), 5)
    return run


def test_silent_server_times_out(short_dir: Path) -> None:
    path = str(short_dir / "silent.sock")

    async def handler(reader, writer):
        await reader.read()  # reads the request, never answers, until the client hangs up

    async def body():
        await VfkitRest(path, timeout=0.2).state()

    with pytest.raises(BackendError, match=r"GET /vm/state: no answer within 0.2s"):
        asyncio.run(_serve(path, handler)(body))


def test_chunked_reply_is_read(short_dir: Path) -> None:
    path = str(short_dir / "chunk.sock")
    payload = json.dumps({"state": "VirtualMachineStatePaused", "canResume": True}).encode()

    async def handler(reader, writer):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        half = len(payload) // 2
        for part in (payload[:half], payload[half:]):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def body():
        return await VfkitRest(path).state()

    state = asyncio.run(_serve(path, handler)(body))
    assert (state.state, state.can_resume) == ("paused", True)


def test_garbage_reply_is_a_backend_error(short_dir: Path) -> None:
    path = str(short_dir / "junk.sock")

    async def handler(reader, writer):
        await reader.readline()
        writer.write(b"SSH-2.0-OpenSSH_9.8\r\n")
        await writer.drain()
        writer.close()

    async def body():
        await VfkitRest(path).state()

    with pytest.raises(BackendError, match="not an HTTP reply"):
        asyncio.run(_serve(path, handler)(body))
