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

from virby.core.config import Config
from virby.core.protocol import FAILED, PAUSED, RUNNING, STARTING, VmState, as_vm_state
from virby.core.timeouts import FORWARDER_DRAIN_TIMEOUT
from virby.workers import bus, reconfig, runtime
from virby.workers.runtime import run_worker

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
DIAL_CONNECT_TIMEOUT = 3.0  # one TCP connect to the guest's forwarded port (loopback: instant)
# A client that has sent nothing when the VM is ready is dialled for in the silent lane, one at
# a time (it moves to the speaking lane as soon as it speaks); real SSH clients send their
# identification as soon as they connect, so they are in the speaking lane.
SILENT_LANE = 1
SILENT_GRACE = 5.0  # a silent-lane client must speak this soon after the guest's banner
# Upstream sessions still in their SSH handshake: fewer than dropbear's 5 unauthenticated
# connections per source address (every connection reaches the guest from QEMU's 10.0.2.2), so
# a storm of clients is let through a few at a time instead of being turned away and redialled.
DIAL_CONCURRENCY = 4
HANDSHAKE_GRACE = 1.0  # how long a new session keeps its place after the client is attached
WAIT_GRACE = 10.0  # a waiting client is held readyTimeout + this before it is closed
# While draining, a client still waiting for the VM is released once the VM is not on its way
# (the arbiter stops it): a stop during a boot must not wait out the drain budget.
VM_COMING: tuple[VmState, ...] = (STARTING, RUNNING, PAUSED)


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
        if self is self.link.client and not self.link.spoke.done():
            self.link.spoke.set_result(None)
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
        self.spoke: asyncio.Future[None] = loop.create_future()  # the client sent its first bytes
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


async def _readable(conn: socket.socket, timeout: float) -> bool:
    """Whether the client sends anything (or closes) within `timeout`; nothing is read."""
    if _peek(conn) is not None:
        return True
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(True)

    loop.add_reader(conn.fileno(), on_readable)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(conn.fileno())


def _peek(conn: socket.socket) -> bytes | None:
    """The client's first unread byte; b"" at EOF, None when nothing has come."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _client_gone(conn: socket.socket) -> bool:
    return _peek(conn) == b""


def _has_data(conn: socket.socket) -> bool:
    return bool(_peek(conn))


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
        self._silent_gate = asyncio.Semaphore(SILENT_LANE)
        self._released = asyncio.Event()  # set while draining once the VM is not coming
        self.draining = False
        self._publish()

    def reload(self) -> None:
        """SIGHUP (`virby reload`; `circusctl reload` restarts the forwarder instead)."""
        result = reconfig.reread(self.config)
        reconfig.report(result, "forwarder")
        self.config = result.config

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
        """Hold the client until the VM runs, then dial the guest for it in its lane (see
        `_lane`). A dial whose endpoint stops being the running VM's (the VM failed, e.g. an
        unresponsive hypervisor was killed) goes back to waiting for the VM; every wait ends by
        `deadline` with the client closed and the reason logged."""
        deadline = time.monotonic() + self.config.readyTimeout + WAIT_GRACE
        spoke = False
        while True:
            endpoint = self._running_endpoint()
            if endpoint is None:
                self.waiting += 1
                self._publish()
                try:
                    endpoint, reason = await self._wait_running(deadline)
                finally:
                    self.waiting -= 1
                if endpoint is None:
                    self.failed += 1
                    log.warning("connection %d closed: %s", cid, reason)
                    conn.close()
                    return
            if not spoke:
                spoke = _peek(conn) is not None  # (a client that waits for our banner: the silent lane)
            if spoke and _client_gone(conn):
                conn.close()  # it left while it waited: nothing to dial for
                return
            outcome = await self._lane(conn, cid, endpoint, spoke, deadline)
            if outcome == "retry":
                spoke = spoke or _has_data(conn)
                continue
            return

    async def _lane(self, conn: socket.socket, cid: int, endpoint: tuple[str, int], spoke: bool,
                    deadline: float) -> str:
        """Dial for one client and copy until it ends. "retry" when the VM went away meanwhile.

        Fairness: every real SSH client sends its identification as soon as it connects, so a
        client that has said nothing when the VM is ready waits for the silent lane, one dial
        at a time (it may be one that waits for the server's banner first), and moves to the
        speaking lane the moment it speaks. The speaking lane has DIAL_CONCURRENCY places,
        first come first served among speakers only, so connections that never speak cannot
        use up the guest sshd's unauthenticated sessions (5 per source address in Debian's
        dropbear) nor the places of clients that do speak. A silent-lane client that still
        says nothing SILENT_GRACE after the guest's banner reached it is closed."""
        gate = self._dial_gate
        if not spoke:
            got = await self._silent_place(conn, deadline)
            if got is None:
                self.failed += 1
                log.warning("connection %d closed: it sent nothing (no SSH identification) within "
                            "%.0fs", cid, self.config.readyTimeout + WAIT_GRACE)
                conn.close()
                return "done"
            if got == "spoke":
                spoke = True
            else:
                gate = self._silent_gate
        if spoke:
            await gate.acquire()
        slot = _Slot(gate)
        try:
            link = await self._dial(endpoint, cid, deadline)
            if link is None:
                if self._endpoint_gone(endpoint) and time.monotonic() < deadline:
                    log.info("connection %d: the VM at %s:%d is no longer running; waiting for it "
                             "again", cid, *endpoint)
                    return "retry"
                self.failed += 1
                conn.close()
                return "done"
            loop = asyncio.get_running_loop()
            try:
                await loop.connect_accepted_socket(lambda: link.client, sock=conn)
            except OSError:
                link.abort()
                return "done"
            self.links.add(link)
            link.start()
            if spoke:
                loop.call_later(HANDSHAKE_GRACE, slot.release)
            else:
                link.spoke.add_done_callback(lambda _f: slot.release())
                loop.call_later(SILENT_GRACE, self._close_if_silent, link, cid)
            try:
                await link.done
            finally:
                self.links.discard(link)
            return "done"
        finally:
            slot.release()

    async def _silent_place(self, conn: socket.socket, deadline: float) -> str | None:
        """Wait for the silent lane's place ("place") or for the client to speak after all
        ("spoke"); None at the deadline."""
        place = asyncio.ensure_future(self._silent_gate.acquire())
        spoke = asyncio.ensure_future(_readable(conn, max(0.0, deadline - time.monotonic())))
        try:
            await asyncio.wait({place, spoke}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            spoke.cancel()
            if not place.done():
                place.cancel()
        if place.done() and not place.cancelled():
            if spoke.done() and not spoke.cancelled() and spoke.result():
                self._silent_gate.release()  # it spoke as well: the speaking lane, after all
                return "spoke"
            return "place"
        return "spoke" if spoke.done() and not spoke.cancelled() and spoke.result() else None

    def _close_if_silent(self, link: _Link, cid: int) -> None:
        if not link.spoke.done() and not link.done.done():
            log.warning("connection %d closed: no SSH identification within %gs of the guest's "
                        "banner", cid, SILENT_GRACE)
            self.failed += 1
            link.close()

    def _endpoint_gone(self, endpoint: tuple[str, int]) -> bool:
        """The vm worker says the VM we dial is no longer there (failed, stopped, another boot)."""
        vm = self.node.peers["vm"]
        if not vm.up:
            return False  # the vm worker is being replaced: the VM most likely runs on
        view = as_vm_state(vm.state)
        ep = view.get("endpoint")
        if view.get("state") in (RUNNING, PAUSED):
            return isinstance(ep, list) and len(ep) == 2 and (str(ep[0]), int(ep[1])) != endpoint
        return True

    async def _dial(self, endpoint: tuple[str, int], cid: int, client_deadline: float) -> _Link | None:
        """Connect upstream and wait for its first bytes, dialling again (with backoff) when it
        closes without a word, until the deadline or until the VM is no longer the one we
        dial. The connect itself has its own deadline: a hung hypervisor's port can leave it
        in SYN retransmits for minutes."""
        loop = asyncio.get_running_loop()
        deadline = min(time.monotonic() + self.config.readyTimeout, client_deadline)
        delay, patience = DIAL_BACKOFF_MIN, DIAL_GREETING_TIMEOUT
        reason = ""
        while time.monotonic() < deadline:
            link = _Link()
            try:
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda link=link: link.upstream,  # type: ignore[misc]
                                               endpoint[0], endpoint[1]),
                        max(0.1, min(DIAL_CONNECT_TIMEOUT, deadline - time.monotonic())))
                except TimeoutError:
                    raise OSError(f"connect timed out after {DIAL_CONNECT_TIMEOUT:g}s") from None
                wait = max(0.0, min(patience, deadline - time.monotonic()))
                if await asyncio.wait_for(asyncio.shield(link.greeted), wait):
                    return link
                reason = "the guest closed the connection before its SSH banner"
            except TimeoutError:  # (a subclass of OSError: catch it first)
                reason = f"the guest sent no SSH banner within {patience:g}s"
                patience = min(patience * 2, DIAL_GREETING_TIMEOUT_MAX)
            except OSError as e:
                reason = f"cannot reach the guest at {endpoint[0]}:{endpoint[1]}: {e}"
            link.abort()
            if self._endpoint_gone(endpoint):
                log.info("connection %d: %s, and the VM is no longer running", cid, reason)
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, DIAL_BACKOFF_MAX)
        log.warning("connection %d closed: %s (for %.0fs)", cid, reason or "no time left to dial",
                    self.config.readyTimeout)
        return None

    def _running_endpoint(self) -> tuple[str, int] | None:
        """Skip the wake round trip when the vm worker's broadcast already says `running`."""
        vm = self.node.peers["vm"]
        view = as_vm_state(vm.state)
        if vm.up and view.get("state") == RUNNING:
            ep = view.get("endpoint")
            if isinstance(ep, list) and len(ep) == 2:
                return str(ep[0]), int(ep[1])
        return None

    async def _wait_running(self, deadline: float) -> tuple[tuple[str, int] | None, str]:
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
            state = as_vm_state(reply.get("state") or {})
            ep = state.get("endpoint")
            if reply["ok"] and state.get("state") == RUNNING and isinstance(ep, list):
                return (str(ep[0]), int(ep[1])), ""
            if state.get("state") == FAILED:
                return None, str(reply.get("error") or state.get("reason"))
            last_error = str(reply.get("error") or f"VM is {state.get('state')}")

    async def _wake_once(self, wait: float) -> dict[str, Any]:
        return await bus.request(self.config, "wake", {"wait": wait}, timeout=wait + 2,
                                 peer=self.node.peers["vm"])

    def on_message(self, msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        if self.draining and msg.sender == "vm":
            self._release_if_vm_not_coming()

    def _release_if_vm_not_coming(self) -> None:
        vm = self.node.peers["vm"]
        if not vm.up or as_vm_state(vm.state).get("state") not in VM_COMING:
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
    runtime.on_sighup(fwd.reload)
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
