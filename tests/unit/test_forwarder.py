"""The forwarder's handling of clients with a fake bus: socketpairs for clients and an
in-process loopback server for the guest's sshd (no processes)."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from virby.core.config import Config, from_dict
from virby.workers import bus, forwarder
from virby.workers.forwarder import Forwarder


class FakeNode:
    def __init__(self, vm_state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = {}
        self.peers = {n: bus.Peer(n) for n in ("vm", "idle")}
        if vm_state is not None:
            self.set_vm(vm_state)
        self.events: list[str] = []

    def set_vm(self, state: dict[str, Any]) -> None:
        vm = self.peers["vm"]
        vm.inc, vm.last_seen, vm.state = "1-1", time.monotonic(), state

    def update(self, **changes: Any) -> None:
        self.state.update(changes)

    def event(self, name: str, **data: Any) -> None:
        self.events.append(name)


@pytest.fixture
def config() -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="vb") as d:
        yield from_dict({"stateDir": f"{d}/state", "runtimeDir": f"{d}/run", "readyTimeout": 5})


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while chunk := await loop.sock_recv(sock, 65536):
        out += chunk
    return out


# -- accept errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(forwarder.OVERLOAD_ERRNOS))
def test_overload_accept_errors_are_retried_after_a_backoff(config: Config, code: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(forwarder.asyncio, "sleep", sleep)

    async def t() -> None:
        fwd = Forwarder(config, socket.socket(), FakeNode())  # type: ignore[arg-type]
        attempts: list[int] = []

        async def accept() -> socket.socket:
            attempts.append(1)
            if len(attempts) <= 3:
                raise OSError(code, "overloaded")
            raise OSError(errno.EBADF, "a bug: stop the loop")

        fwd._accept = accept  # type: ignore[method-assign]
        with pytest.raises(OSError) as e:
            await fwd.accept_loop()
        assert e.value.errno == errno.EBADF  # anything else ends the loop (circus restarts us)
        assert len(attempts) == 4 and sleeps == [forwarder.OVERLOAD_BACKOFF] * 3

    run(t)


def test_client_accept_errors_are_retried_at_once(config: Config) -> None:
    async def t() -> None:
        fwd = Forwarder(config, socket.socket(), FakeNode())  # type: ignore[arg-type]
        codes = [errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.ENOTSOCK]

        async def accept() -> socket.socket:
            raise OSError(codes.pop(0), "x")

        fwd._accept = accept  # type: ignore[method-assign]
        with pytest.raises(OSError) as e:
            await fwd.accept_loop()
        assert e.value.errno == errno.ENOTSOCK and codes == []

    run(t)


# -- waiting for the VM -----------------------------------------------------------------------


def test_a_client_is_closed_when_the_vm_never_becomes_running(config: Config,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "WAIT_GRACE", 0.0)
    monkeypatch.setattr(forwarder, "WAKE_SLICE", 0.2)
    config = from_dict({**json.loads(config.to_json()), "readyTimeout": 1})

    async def t() -> None:
        node = FakeNode()
        fwd = Forwarder(config, socket.socket(), node)  # type: ignore[arg-type]
        wakes: list[float] = []

        async def wake_once(wait: float) -> dict[str, Any]:
            wakes.append(wait)
            await asyncio.sleep(wait)
            return {"ok": False, "state": {"state": "starting"}}

        fwd._wake_once = wake_once  # type: ignore[method-assign]
        client, conn = socket.socketpair()
        client.setblocking(False)
        await fwd.serve(conn)
        assert await recv_all(client) == b""  # closed, not left hanging
        assert fwd.failed == 1 and fwd.open == 0 and node.events == ["open", "close"]
        assert len(wakes) > 1  # the wait was renewed until the deadline

    run(t)


def test_a_failed_boot_releases_the_client_with_the_reason(config: Config,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async def t() -> None:
        fwd = Forwarder(config, socket.socket(), FakeNode())  # type: ignore[arg-type]

        async def wake_once(wait: float) -> dict[str, Any]:
            return {"ok": False, "error": "boot failed: no kernel", "state": {"state": "failed"}}

        fwd._wake_once = wake_once  # type: ignore[method-assign]
        client, conn = socket.socketpair()
        client.setblocking(False)
        await fwd.serve(conn)
        assert await recv_all(client) == b""

    run(t)
    assert "connection 1 closed: boot failed: no kernel" in caplog.text


def test_draining_releases_clients_waiting_for_a_vm_that_is_stopping(config: Config) -> None:
    async def t() -> None:
        node = FakeNode({"state": "starting"})
        fwd = Forwarder(config, socket.socket(), node)  # type: ignore[arg-type]

        async def wake_once(wait: float) -> dict[str, Any]:
            await asyncio.sleep(wait)
            return {"ok": False, "state": {"state": "starting"}}

        fwd._wake_once = wake_once  # type: ignore[method-assign]
        client, conn = socket.socketpair()
        client.setblocking(False)
        task = asyncio.create_task(fwd.serve(conn))
        fwd.tasks.add(task)
        drain = asyncio.create_task(fwd.drain(30))
        await asyncio.sleep(0.05)
        assert not drain.done()  # the boot goes on: the client keeps waiting for it
        node.set_vm({"state": "stopped"})  # the vm worker stops with the arbiter
        fwd.on_message(bus.Message("state", "vm", "1-1", 2, time.time(), {}), node.peers["vm"], False)
        await drain
        assert await recv_all(client) == b"" and fwd.failed == 1

    run(t)


# -- copying ----------------------------------------------------------------------------------


async def guest_sshd(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                     ) -> tuple[asyncio.Server, tuple[str, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, (host, port)


def test_half_close_both_ways(config: Config) -> None:
    """The client's EOF reaches the guest while the guest still answers; then the guest's EOF
    reaches the client."""
    async def t() -> None:
        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-guest\r\n")
            request = await reader.read()  # until the client's EOF
            writer.write(b"got " + request)
            await writer.drain()
            writer.write_eof()
            await reader.read()
            writer.close()

        server, ep = await guest_sshd(sshd)
        node = FakeNode({"state": "running", "endpoint": list(ep)})
        fwd = Forwarder(config, socket.socket(), node)  # type: ignore[arg-type]
        client, conn = socket.socketpair()
        client.setblocking(False)
        serving = asyncio.create_task(fwd.serve(conn))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"hello")
        client.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
        assert await recv_all(client) == b"SSH-2.0-guest\r\ngot hello"
        client.close()
        await serving
        assert fwd.open == 0
        server.close()

    run(t)


def test_the_guest_closing_first_still_delivers_the_client_data(config: Config) -> None:
    async def t() -> None:
        got = asyncio.get_running_loop().create_future()

        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-guest\r\nbye")
            writer.write_eof()  # the guest is done sending, still reading
            got.set_result(await reader.read())
            writer.close()

        server, ep = await guest_sshd(sshd)
        fwd = Forwarder(config, socket.socket(), FakeNode({"state": "running", "endpoint": list(ep)}))  # type: ignore[arg-type]
        client, conn = socket.socketpair()
        client.setblocking(False)
        serving = asyncio.create_task(fwd.serve(conn))
        assert await recv_all(client) == b"SSH-2.0-guest\r\nbye"  # EOF passed on
        await asyncio.get_running_loop().sock_sendall(client, b"still here")
        client.shutdown(socket.SHUT_WR)
        assert await got == b"still here"
        client.close()
        await serving
        server.close()

    run(t)


def test_the_dial_gate_lets_few_handshakes_through_at_once(config: Config,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder, "HANDSHAKE_GRACE", 0.0)

    async def t() -> None:
        pending = 0
        most = 0
        release = asyncio.Event()

        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal pending, most
            pending += 1
            most = max(most, pending)
            await release.wait()
            pending -= 1
            writer.write(b"SSH-2.0-guest\r\n")
            await writer.drain()
            writer.close()

        server, ep = await guest_sshd(sshd)
        fwd = Forwarder(config, socket.socket(), FakeNode({"state": "running", "endpoint": list(ep)}))  # type: ignore[arg-type]
        pairs = [socket.socketpair() for _ in range(3 * forwarder.DIAL_CONCURRENCY)]
        for client, _ in pairs:
            client.sendall(b"SSH-2.0-client\r\n")  # real clients speak at once
        serving = [asyncio.create_task(fwd.serve(conn)) for _, conn in pairs]
        while pending < forwarder.DIAL_CONCURRENCY:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room for a gate that leaks to show it
        assert most == forwarder.DIAL_CONCURRENCY
        release.set()
        for client, _ in pairs:
            client.setblocking(False)
            client.shutdown(socket.SHUT_WR)
            assert await recv_all(client) == b"SSH-2.0-guest\r\n"
            client.close()
        await asyncio.gather(*serving)
        assert most == forwarder.DIAL_CONCURRENCY and fwd.failed == 0
        server.close()

    run(t)


def test_silent_connections_do_not_starve_a_client_that_speaks(config: Config,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: connections that never send their SSH identification took the dial places
    (and the guest sshd's unauthenticated sessions) a real client needed. Now they wait in a
    lane of their own, one dial at a time: a real client that comes while that lane is full is
    dialled for at once, before any other silent connection."""
    monkeypatch.setattr(forwarder, "SILENT_GRACE", 60.0)  # the lane's holder keeps it throughout

    async def t() -> None:
        accepted = 0
        unauthenticated = 0
        most = 0
        lane_full = asyncio.Event()
        accepted_when_real_spoke: list[int] = []

        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted, unauthenticated, most
            accepted += 1
            unauthenticated += 1
            most = max(most, unauthenticated)
            if accepted >= forwarder.SILENT_LANE:
                lane_full.set()
            writer.write(b"SSH-2.0-guest\r\n")
            first = await reader.readline()  # the client's identification, or EOF
            unauthenticated -= 1
            if first == b"SSH-2.0-real\r\n":
                accepted_when_real_spoke.append(accepted)
            if first:
                writer.write(b"hello " + first)
            await writer.drain()
            writer.close()

        server, ep = await guest_sshd(sshd)
        fwd = Forwarder(config, socket.socket(), FakeNode({"state": "running", "endpoint": list(ep)}))  # type: ignore[arg-type]
        silent = [socket.socketpair() for _ in range(40)]
        serving = [asyncio.create_task(fwd.serve(conn)) for _, conn in silent]
        await asyncio.wait_for(lane_full.wait(), 30)  # the lane's place is taken, the rest queue
        client, conn = socket.socketpair()
        client.sendall(b"SSH-2.0-real\r\n")
        real = asyncio.create_task(fwd.serve(conn))
        client.setblocking(False)
        got = await asyncio.wait_for(recv_all(client), 30)  # (a hang guard, not a latency bound)
        assert got == b"SSH-2.0-guest\r\nhello SSH-2.0-real\r\n"
        # the guest had seen only the lane's silent connection(s) and the real one: the real
        # client was not queued behind the other 39
        assert accepted_when_real_spoke == [forwarder.SILENT_LANE + 1], accepted_when_real_spoke
        client.close()
        await real
        assert most <= forwarder.SILENT_LANE + 1  # the silent never took more than their lane
        for c, _ in silent:
            c.close()
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        server.close()

    run(t)


def test_a_silent_connection_is_closed_when_it_stays_silent_after_the_banner(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The silent lane's holder gets SILENT_GRACE after the guest's banner to speak; one that
    does not is closed (both ends), so the next silent connection can have the lane."""
    monkeypatch.setattr(forwarder, "SILENT_GRACE", 0.3)

    async def t() -> None:
        saw: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-guest\r\n")
            saw.set_result(await reader.read())  # until the forwarder closes its side
            writer.close()

        server, ep = await guest_sshd(sshd)
        fwd = Forwarder(config, socket.socket(), FakeNode({"state": "running", "endpoint": list(ep)}))  # type: ignore[arg-type]
        client, conn = socket.socketpair()
        serving = asyncio.create_task(fwd.serve(conn))
        client.setblocking(False)
        got = await asyncio.wait_for(recv_all(client), 30)  # EOF: the forwarder closed it
        assert got == b"SSH-2.0-guest\r\n"
        await asyncio.wait_for(serving, 30)
        # and the guest's side was closed too, with nothing sent (the guest's handler is a task
        # of its own: it sees the EOF a moment after the forwarder is done)
        assert await asyncio.wait_for(saw, 30) == b""
        client.close()
        server.close()

    run(t)


def test_a_client_that_waits_for_the_server_banner_is_still_served(config: Config,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async def t() -> None:
        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-guest\r\n")
            writer.write(b"echo " + await reader.readline())
            await writer.drain()
            writer.close()

        server, ep = await guest_sshd(sshd)
        fwd = Forwarder(config, socket.socket(), FakeNode({"state": "running", "endpoint": list(ep)}))  # type: ignore[arg-type]
        client, conn = socket.socketpair()
        client.setblocking(False)
        serving = asyncio.create_task(fwd.serve(conn))
        loop = asyncio.get_running_loop()
        banner = await loop.sock_recv(client, 100)
        assert banner == b"SSH-2.0-guest\r\n"
        await loop.sock_sendall(client, b"SSH-2.0-late\r\n")
        client.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == b"echo SSH-2.0-late\r\n"
        await serving
        server.close()

    run(t)


def test_a_dial_to_a_vm_that_failed_goes_back_to_waiting(config: Config,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: clients of a frozen hypervisor sat in connect() until ssh's own timeout. A dial
    whose VM the vm worker no longer reports running stops and waits for the next VM."""
    monkeypatch.setattr(forwarder, "DIAL_GREETING_TIMEOUT", 0.2)

    async def t() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # a hung guest: accepts, never speaks

        async def sshd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-new\r\n")
            await writer.drain()
            writer.close()

        hung, hung_ep = await guest_sshd(mute)
        fresh, fresh_ep = await guest_sshd(sshd)
        node = FakeNode({"state": "running", "endpoint": list(hung_ep)})
        fwd = Forwarder(config, socket.socket(), node)  # type: ignore[arg-type]
        wakes = 0

        async def wake_once(wait: float) -> dict[str, Any]:
            nonlocal wakes
            wakes += 1
            state = {"state": "running", "endpoint": list(fresh_ep)}
            node.set_vm(state)
            return {"ok": True, "state": state}

        fwd._wake_once = wake_once  # type: ignore[method-assign]
        client, conn = socket.socketpair()
        client.sendall(b"SSH-2.0-client\r\n")
        client.setblocking(False)
        serving = asyncio.create_task(fwd.serve(conn))
        await asyncio.sleep(0.3)
        node.set_vm({"state": "failed", "reason": "the hypervisor stopped answering"})
        client.shutdown(socket.SHUT_WR)
        assert await recv_all(client) == b"SSH-2.0-new\r\n"
        await serving
        assert wakes == 1 and fwd.failed == 0
        hung.close()
        fresh.close()

    run(t)
