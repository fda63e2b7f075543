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
# A `time` line is stale by the time the agent runs it. An answer within this round trip bounds
# the guest's error to it plus the agent's rounding (0.5 s); a slower one is sent again (a guest
# just restored under emulation runs slowly for a moment, then catches up).
CLOCK_ROUND_TRIP = 0.4
CLOCK_TRIES = 5
CLOCK_ANSWER_TIMEOUT = 10.0
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
        self.clock_set = asyncio.Event()  # the agent confirmed a `time` within CLOCK_ROUND_TRIP
        self._clock: asyncio.Task[None] | None = None
        self._time_unanswered = 0  # `time` lines sent and not yet answered (they run in order)
        self._time_sent_at = 0.0  # monotonic, of the latest
        self._time_answer: tuple[float, bool] | None = None  # (round trip, ok) of the latest
        self._time_answered = asyncio.Event()

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
        elif line in ("virby-time-ok", "virby-error time"):
            self._on_time_answer(line == "virby-time-ok")
        if line.startswith("virby-error"):
            log.warning("the guest agent answered %r", line)

    def _on_time_answer(self, ok: bool) -> None:
        self._time_unanswered = max(0, self._time_unanswered - 1)
        if self._time_unanswered == 0:  # the answer to the latest `time`, not an earlier one's
            self._time_answer = (time.monotonic() - self._time_sent_at, ok)
            self._time_answered.set()

    def _time(self) -> str:
        """The `time` line, counted so that its own answer times its round trip."""
        self._time_unanswered += 1
        self._time_sent_at = time.monotonic()
        self._time_answer = None
        self._time_answered.clear()
        return time_line()

    async def _confirm_clock(self) -> None:
        """Wait for the agent's answer to the latest `time`; when it came slowly, the clock may
        have been set late (that far behind): send it again."""
        for attempt in range(1, CLOCK_TRIES + 1):
            try:
                await asyncio.wait_for(self._time_answered.wait(), CLOCK_ANSWER_TIMEOUT)
            except TimeoutError:
                log.warning("the guest agent did not answer the clock within %gs", CLOCK_ANSWER_TIMEOUT)
                return
            assert self._time_answer is not None
            round_trip, ok = self._time_answer
            if not ok:
                return  # logged with the answer
            if round_trip <= CLOCK_ROUND_TRIP:
                log.info("guest clock set (answered in %.3fs)", round_trip)
                self.clock_set.set()
                return
            if attempt == CLOCK_TRIES:
                log.warning("guest clock set, but every answer took %.2fs or more: it may be that "
                            "far behind", round_trip)
                return
            log.info("the guest took %.2fs to answer the clock: setting it again", round_trip)
            self.send(self._time())

    def _start_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self.clock_set.clear()
        self._clock = asyncio.create_task(self._confirm_clock())

    async def wait_clock(self) -> bool:
        """Until the latest clock setting is confirmed or given up: True when confirmed."""
        if self._clock is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._clock)
        return self.clock_set.is_set()

    def set_clock(self) -> None:
        """Set the guest clock to ours (after a resume: a paused guest's clock stood still),
        confirmed in the background."""
        self._send_timed()

    def _send_timed(self, *after: str) -> None:
        if self.send(self._time(), *after):
            self._start_clock()

    def send(self, *lines: str) -> bool:
        """Queue lines for the guest; the agent handles them in order. Never blocks. False
        when the channel is closed (nothing sent)."""
        if self.closed.is_set() or self._writer.is_closing():
            log.info("not sent to the guest agent (%s is closed): %s", self.where, lines)
            return False
        self._writer.write("".join(f"{line}\n" for line in lines).encode())
        return True

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
        self._send_timed(*([f"seed {seed.hex()}"] if seed is not None else []), "hello")

    async def close(self) -> None:
        tasks = [t for t in (self._greeting, self._clock, self._reader_task) if t is not None]
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
