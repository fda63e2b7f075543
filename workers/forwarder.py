"""The SSH forwarder: accepts on the listening socket circusd hands us, wakes the VM, holds each
client until the VM is `running` (or the deadline passes: then the client is closed and the log
says why), then copies bytes both ways.

Resource handling: circusd owns the listening socket; we only close our copy of its fd, so
connections queue in the kernel backlog while we restart. Each accepted client socket and its
upstream connection belong to one `_Link`, which closes both. The socket's O_NONBLOCK flag is
shared with circusd and is left as circus set it.

Error handling (accept): EMFILE, ENFILE, ENOMEM, ENOBUFS mean the system is overloaded: log
once, back off 100 ms, retry. ECONNABORTED and friends concern one client: retry at once.
Anything else is a bug and ends the process (circus restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from typing import Any

from virby.supervisor.config import Config
from virby.workers import bus
from virby.workers.runtime import run_worker
from virby.workers.timeouts import FORWARDER_DRAIN_TIMEOUT

log = logging.getLogger("virby.forwarder")

OVERLOAD_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
CLIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}
OVERLOAD_BACKOFF = 0.1
WRITE_HIGH_WATER = 4 * 1024 * 1024
WAKE_SLICE = 5.0
DIAL_BACKOFF_MIN = 0.05
DIAL_BACKOFF_MAX = 1.0
# A ready guest sends its banner within milliseconds; one that does not was busy (or its sshd
# never accepted): dial again rather than wait out the whole deadline on one connection.
DIAL_GREETING_TIMEOUT = 3.0
DIAL_GREETING_TIMEOUT_MAX = 12.0  # seconds one wake request may wait; renewed until the deadline
# Upstream sessions still in their SSH handshake: fewer than dropbear's 5 unauthenticated
# connections per source address (every connection reaches the guest from QEMU's 10.0.2.2), so
# a storm of clients is let through a few at a time instead of being turned away and redialled.
DIAL_CONCURRENCY = 4
HANDSHAKE_GRACE = 1.0  # how long a new session keeps its place after the client is attached
WAIT_GRACE = 10.0  # a waiting client is held readyTimeout + this before it is closed
# While draining, a client still waiting for the VM is released once the VM is not on its way
# (the arbiter stops it): a stop during a boot must not wait out the drain budget.
VM_COMING = ("starting", "running", "paused")


class _Half(asyncio.Protocol):
    """One direction's reader; writes what it reads into its peer's transport."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.link.started and self is self.link.client:
            transport.pause_reading()  # nowhere to send yet

    def data_received(self, data: bytes) -> None:
        if not self.link.started:
            # The upstream's greeting (the SSH banner) arrives before the client is attached.
            self.link.greeting += data
            if self.transport is not None:
                self.transport.pause_reading()
            if not self.link.greeted.done():
                self.link.greeted.set_result(True)
            return
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)
        self.link.bytes += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.link.started:
            self.link.close()
            return False
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()  # half-close: pass the EOF on, keep the other way open
        if peer is None or peer.eof:
            self.link.close()
        return True

    # Flow control: when the peer cannot take more, stop reading from our side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()


class _Slot:
    """One held place in the dial gate; `release` is idempotent."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self.gate: asyncio.Semaphore | None = gate

    def release(self) -> None:
        if self.gate is not None:
            self.gate.release()
            self.gate = None


class _Link:
    """A client and its upstream. Owns both transports and closes both.

    The client is attached only once the upstream has said something: an SSH server speaks
    first, and one that closes before its banner (dropbear turns away a sixth unauthenticated
    connection from one address; QEMU's user networking accepts before the guest listens) is
    simply dialled again while the client waits."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.client = _Half(self)
        self.upstream = _Half(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.done = loop.create_future()
        self.greeted: asyncio.Future[bool] = loop.create_future()
        self.greeting = b""
        self.started = False
        self.bytes = 0

    def start(self) -> None:
        """Attach the client: hand it the greeting, then copy both ways."""
        self.started = True
        assert self.client.transport is not None
        self.client.transport.write(self.greeting)
        self.bytes += len(self.greeting)
        self.greeting = b""
        for half in (self.client, self.upstream):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.resume_reading()

    def close(self) -> None:
        if not self.greeted.done():
            self.greeted.set_result(False)
        for half in (self.client, self.upstream):
            if half.transport is not None:
                half.transport.close()  # flushes what is buffered, then closes
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        if not self.greeted.done():
            self.greeted.set_result(False)
        for half in (self.client, self.upstream):
            if half.transport is not None:
                half.transport.abort()
        if not self.done.done():
            self.done.set_result(None)


class Forwarder:
    def __init__(self, config: Config, listener: socket.socket, node: bus.Node) -> None:
        self.config = config
        self.listener = listener
        self.node = node
        self.open = 0
        self.waiting = 0
        self.accepted = 0
        self.failed = 0
        self.last_activity = time.time()
        self.links: set[_Link] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Task[dict[str, Any]] | None = None
        self._overloaded = False
        self._dial_gate = asyncio.Semaphore(DIAL_CONCURRENCY)
        self._released = asyncio.Event()  # set while draining once the VM is not coming
        self.draining = False
        self._publish()

    def _publish(self) -> None:
        self.node.update(open=self.open, waiting=self.waiting, accepted=self.accepted,
                         failed=self.failed, last_activity=self.last_activity)

    async def _accept(self) -> socket.socket:
        conn, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        return conn

    async def accept_loop(self) -> None:
        while True:
            try:
                conn = await self._accept()
            except OSError as e:
                if e.errno in OVERLOAD_ERRNOS:
                    if not self._overloaded:
                        log.error("accept failed (%s); backing off until it works again", e)
                    self._overloaded = True
                    await asyncio.sleep(OVERLOAD_BACKOFF)
                    continue
                if e.errno in CLIENT_ERRNOS:
                    continue
                raise
            if self._overloaded:
                log.info("accepting again")
                self._overloaded = False
            task = asyncio.create_task(self.serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.open += 1
        self.accepted += 1
        cid = self.accepted
        self.last_activity = time.time()
        self._publish()
        self.node.event("open", conn=cid, open=self.open)
        try:
            await self._serve(conn, cid)
        finally:
            self.open -= 1
            self.last_activity = time.time()
            self._publish()
            self.node.event("close", conn=cid, open=self.open)

    async def _serve(self, conn: socket.socket, cid: int) -> None:
        endpoint = self._running_endpoint()
        if endpoint is None:
            self.waiting += 1
            self._publish()
            try:
                endpoint, reason = await self._wait_running()
            finally:
                self.waiting -= 1
            if endpoint is None:
                self.failed += 1
                log.warning("connection %d closed: %s", cid, reason)
                conn.close()
                return
        await self._dial_gate.acquire()
        slot = _Slot(self._dial_gate)
        try:
            link = await self._dial(endpoint, cid)
            if link is None:
                self.failed += 1
                conn.close()
                return
            loop = asyncio.get_running_loop()
            try:
                await loop.connect_accepted_socket(lambda: link.client, sock=conn)
            except OSError:
                link.abort()
                return
            self.links.add(link)
            link.start()
            loop.call_later(HANDSHAKE_GRACE, slot.release)
            try:
                await link.done
            finally:
                self.links.discard(link)
        finally:
            slot.release()

    async def _dial(self, endpoint: tuple[str, int], cid: int) -> _Link | None:
        """Connect upstream and wait for its first bytes, dialling again (with backoff) when it
        closes without a word, until the deadline."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.config.readyTimeout
        delay, patience = DIAL_BACKOFF_MIN, DIAL_GREETING_TIMEOUT
        reason = ""
        while time.monotonic() < deadline:
            link = _Link()
            try:
                await loop.create_connection(lambda link=link: link.upstream,  # type: ignore[misc]
                                             endpoint[0], endpoint[1])
                wait = max(0.0, min(patience, deadline - time.monotonic()))
                if await asyncio.wait_for(asyncio.shield(link.greeted), wait):
                    return link
                reason = "the guest closed the connection before its SSH banner"
            except TimeoutError:  # (a subclass of OSError: catch it first)
                reason = "the guest sent no SSH banner"
                patience = min(patience * 2, DIAL_GREETING_TIMEOUT_MAX)
            except OSError as e:
                reason = f"cannot reach the guest at {endpoint[0]}:{endpoint[1]}: {e}"
            link.abort()
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, DIAL_BACKOFF_MAX)
        log.warning("connection %d closed: %s (for %.0fs)", cid, reason, self.config.readyTimeout)
        return None

    def _running_endpoint(self) -> tuple[str, int] | None:
        """Skip the wake round trip when the vm worker's broadcast already says `running`."""
        vm = self.node.peers["vm"]
        if vm.up and vm.state.get("state") == "running":
            ep = vm.state.get("endpoint")
            if isinstance(ep, list) and len(ep) == 2:
                return str(ep[0]), int(ep[1])
        return None

    async def _wait_running(self) -> tuple[tuple[str, int] | None, str]:
        deadline = time.monotonic() + self.config.readyTimeout + WAIT_GRACE
        last_error = "the VM did not become ready"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, f"{last_error} (waited {self.config.readyTimeout + WAIT_GRACE:g}s)"
            if self._released.is_set():
                return None, "the VM is stopping with the arbiter"
            # All clients waiting now share one wake request: one boot, one round trip.
            if self._wake is None or self._wake.done():
                self._wake = asyncio.create_task(self._wake_once(min(WAKE_SLICE, remaining)))
            released = asyncio.ensure_future(self._released.wait())
            try:  # (the shared wake is never cancelled by one client's wait)
                await asyncio.wait({self._wake, released}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                released.cancel()
            if not self._wake.done():
                continue
            try:
                reply = self._wake.result()
            except bus.RequestError as e:
                last_error = str(e)
                continue
            state = reply.get("state") or {}
            ep = state.get("endpoint")
            if reply.get("ok") and state.get("state") == "running" and isinstance(ep, list):
                return (str(ep[0]), int(ep[1])), ""
            if state.get("state") == "failed":
                return None, str(reply.get("error") or state.get("reason"))
            last_error = str(reply.get("error") or f"VM is {state.get('state')}")

    async def _wake_once(self, wait: float) -> dict[str, Any]:
        return await bus.request(self.config, "wake", {"wait": wait}, timeout=wait + 2)

    def on_message(self, msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        if self.draining and msg.sender == "vm":
            self._release_if_vm_not_coming()

    def _release_if_vm_not_coming(self) -> None:
        vm = self.node.peers["vm"]
        if not vm.up or vm.state.get("state") not in VM_COMING:
            self._released.set()

    async def drain(self, timeout: float) -> None:
        self.draining = True
        self._release_if_vm_not_coming()
        if not self.links and not self.tasks:
            return
        log.info("draining %d connection(s) for up to %.0fs", len(self.tasks), timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout)
        for link in list(self.links):
            link.abort()
        for t in list(self.tasks):
            t.cancel()


async def main(config: Config, stop: asyncio.Event, fd: int) -> None:
    parent = os.getppid()
    listener = socket.socket(fileno=fd)
    node = bus.Node("forwarder", config)
    fwd = Forwarder(config, listener, node)
    node.on_message = fwd.on_message
    await node.start()
    accept = asyncio.create_task(fwd.accept_loop())
    log.info("forwarder ready on %s (incarnation %s)", listener.getsockname(), node.inc)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({accept, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    error = accept.exception() if accept.done() else None
    if not accept.done():
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
    # Close only our copy of the fd: circusd keeps listening and queues new clients.
    asyncio.get_running_loop().remove_reader(fd)
    listener.detach()
    os.close(fd)
    orphaned = os.getppid() != parent
    await fwd.drain(0 if orphaned else FORWARDER_DRAIN_TIMEOUT)
    await node.close()
    if error is not None:
        raise error


def cli() -> None:
    parser = argparse.ArgumentParser(prog="virby-forwarder")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket from circusd")
    args = parser.parse_args()
    run_worker("forwarder", lambda config, stop: main(config, stop, args.fd))


if __name__ == "__main__":
    cli()
