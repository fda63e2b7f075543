"""The host's side of the guest agent (image/guest/common/usr/sbin/virby-agent): one client for
every backend and transport. The agent sits on an unnamed virtio console port, which vfkit
gives as a host pty (`--device virtio-serial,pty`) and QEMU as a pty (`qemuDevices: "vfkit"`)
or a unix socket (its standard layout).

Lines end in "\\n".
  guest -> host: "virby-ready [<ipv4>]" (sshd listens; the address where the host must dial
                 it, when the guest knows one), "virby-booting", "virby-time-ok",
                 "virby-seed-ok", "virby-error <what>". Anything else is console noise: ignored.
  host -> guest: "hello" (answered virby-ready or virby-booting), "time <epoch>",
                 "seed <hex>", "poweroff".

Resource handling: an `AgentChannel` owns its transport and its reader task; `close()` ends
both. A pty or socket that goes away (the hypervisor exited) ends the reader: `heard` and
`ready` then stay as they were and `closed` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import termios
import time
import tty

log = logging.getLogger("virby.agent")

HELLO_INTERVAL = 0.5  # resend "hello" until the agent answers: its port may open after ours
_MAX_LINE = 512
_WORDS = frozenset({"virby-ready", "virby-booting", "virby-time-ok", "virby-seed-ok", "virby-error"})


def time_line() -> str:
    """`time <epoch>` rounded to the nearest second: the agent sets whole seconds (busybox
    date), so the fraction would leave the guest up to a second behind."""
    return f"time {round(time.time())}"


def parse_ready(line: str) -> tuple[bool, str | None]:
    """("virby-ready 192.168.64.3") -> (True, "192.168.64.3"); a bad or absent address is None."""
    word, _, rest = line.partition(" ")
    if word != "virby-ready":
        return False, None
    try:
        ip = ipaddress.IPv4Address(rest.strip())
    except ValueError:
        return True, None
    return True, None if ip.is_unspecified or ip.is_multicast or ip.is_loopback else str(ip)


class AgentChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str,
                 read_transport: asyncio.BaseTransport | None = None):
        self.where = where
        self._read_transport = read_transport  # a pty's read side (a socket has one transport)
        self.heard = asyncio.Event()  # the agent has said anything at all
        self.ready = asyncio.Event()  # its latest word is virby-ready
        self.closed = asyncio.Event()
        self.address: str | None = None  # the guest's address, as the agent last announced it
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader))
        self._greeting: asyncio.Task[None] | None = None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                self._on_line(raw[:_MAX_LINE].decode("ascii", "replace").strip())
        except (OSError, ValueError, asyncio.LimitOverrunError) as e:
            # a pty whose other side closed reads EIO; an overlong line of noise ends nothing
            log.info("the agent channel %s ended: %s", self.where, e)
        finally:
            self.closed.set()

    def _on_line(self, line: str) -> None:
        if line.partition(" ")[0] not in _WORDS:
            return  # console noise on a shared port, or an echo of ours
        self.heard.set()
        ready, ip = parse_ready(line)
        if ready:
            if ip is not None:
                self.address = ip
            if not self.ready.is_set():
                log.info("the guest agent announced sshd%s (%s)", f" at {ip}" if ip else "",
                         self.where)
            self.ready.set()
        elif line == "virby-booting":
            self.ready.clear()
        elif line.startswith("virby-error"):
            log.warning("the guest agent answered %r", line)

    def send(self, *lines: str) -> None:
        """Queue lines for the guest; the agent handles them in order. Never blocks."""
        if self.closed.is_set() or self._writer.is_closing():
            log.info("not sent to the guest agent (%s is closed): %s", self.where, lines)
            return
        self._writer.write("".join(f"{line}\n" for line in lines).encode())

    async def greet(self) -> None:
        """Send "hello" until the agent answers anything (runs until cancelled or answered):
        its port may open after ours, and QEMU drops what a pty carries before it sees us."""
        self.send("hello")
        while not self.heard.is_set() and not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.heard.wait(), HELLO_INTERVAL)
            if not self.heard.is_set():
                self.send("hello")

    def start_greeting(self) -> None:
        """`greet` in the background, until the agent answers or the channel closes."""
        if self._greeting is None or self._greeting.done():
            self._greeting = asyncio.create_task(self.greet())

    def sync(self, seed: bytes | None = None) -> None:
        """After a resume or a restore: the clock, the entropy, then a hello whose answer
        (virby-ready) comes after both are in place."""
        self.ready.clear()
        self.send(time_line(), *([f"seed {seed.hex()}"] if seed is not None else []), "hello")

    async def close(self) -> None:
        tasks = [t for t in (self._greeting, self._reader_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.close()
        if self._read_transport is not None:
            self._read_transport.close()


async def open_socket(path: str) -> AgentChannel:
    """The agent's port as a unix socket (QEMU's socket chardev)."""
    reader, writer = await asyncio.open_unix_connection(path, limit=_MAX_LINE * 8)
    return AgentChannel(reader, writer, path)


async def open_pty(path: str) -> AgentChannel:
    """The agent's port as a host pty (vfkit's `virtio-serial,pty`, QEMU's pty chardev). Raw
    mode: with the line discipline's echo on, every line would come back to its sender."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd, termios.TCSANOW)
        wfd = os.dup(fd)
    except OSError:
        os.close(fd)
        raise
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_LINE * 8)
    try:
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    except BaseException:
        os.close(wfd)
        raise
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
        os.fdopen(wfd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return AgentChannel(reader, writer, path, read_transport)
