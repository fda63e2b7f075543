"""The host's agent client (workers/agent.py): what it makes of the guest's lines, and the pty
transport vfkit and QEMU's vfkit layout give, on a real pty pair (no process)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from virby.workers import agent
from virby.workers.agent import AgentChannel


class Sink:
    """A StreamWriter's write side, kept in memory."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def fed(*lines: bytes) -> tuple[AgentChannel, Sink]:
    reader = asyncio.StreamReader()
    for line in lines:
        reader.feed_data(line)
    reader.feed_eof()
    sink = Sink()
    ch = AgentChannel(reader, sink, "test")  # type: ignore[arg-type]
    await ch.closed.wait()
    return ch, sink


def test_ready_with_the_guests_address() -> None:
    ch, _ = asyncio.run(fed(b"virby-booting\n", b"virby-ready 192.168.64.7\n"))
    assert ch.heard.is_set() and ch.ready.is_set()
    assert ch.address == "192.168.64.7"


@pytest.mark.parametrize("line", [b"virby-ready\n", b"virby-ready 0.0.0.0\n",
                                  b"virby-ready 127.0.0.1\n", b"virby-ready nonsense\n"])
def test_ready_without_a_usable_address(line: bytes) -> None:
    ch, _ = asyncio.run(fed(line))
    assert ch.ready.is_set() and ch.address is None


def test_console_noise_and_echoes_are_not_words_of_the_agent() -> None:
    """A port shared with kernel messages, or a pty still echoing what we wrote."""
    ch, _ = asyncio.run(fed(b"[    1.2] virtio_net virtio0: eth0\n", b"hello\n", b"time 5\n",
                            b"virby-ready-ish\n", b"\x00\xff garbage\r\n", b"x" * 5000 + b"\n"))
    assert not ch.heard.is_set() and not ch.ready.is_set()


def test_booting_after_ready_is_not_ready() -> None:
    """A restored guest answers the post-restore hello afresh: the old ready does not count."""
    ch, _ = asyncio.run(fed(b"virby-ready\n", b"virby-booting\n"))
    assert ch.heard.is_set() and not ch.ready.is_set()


def test_replies_do_not_pile_up() -> None:
    """Every resume's `time` and every `hello` is answered: nothing of it may be kept."""
    ch, _ = asyncio.run(fed(*[b"virby-time-ok\n"] * 1000, b"virby-ready\n"))
    assert ch.ready.is_set()
    assert all(not isinstance(v, list | dict | asyncio.Queue) for v in vars(ch).values())


def test_sync_sends_clock_seed_then_hello_and_clears_ready() -> None:
    async def t() -> tuple[AgentChannel, Sink]:
        ch, sink = await fed(b"virby-ready\n")
        ch.closed.clear()
        ch.sync(b"\x01\xab")
        return ch, sink

    before = time.time()
    ch, sink = asyncio.run(t())
    after = time.time()
    lines = sink.data.decode().splitlines()
    # the host's clock (whole seconds, rounded) when it synced: between the readings around it
    assert lines[0].startswith("time ") and round(before) <= int(lines[0][5:]) <= round(after)
    assert lines[1:] == ["seed 01ab", "hello"]
    assert not ch.ready.is_set()


def times_sent(sink: Sink) -> list[str]:
    return [line for line in sink.data.decode().splitlines() if line.startswith("time ")]


async def answered(sink: Sink, n: int) -> None:
    """Until the host has written its n-th `time` line."""
    while len(times_sent(sink)) < n:
        sink.wrote.clear()
        await sink.wrote.wait()


async def clock_answered_after(delays: list[float], answer: bytes = b"virby-time-ok\n") -> tuple[bool, Sink]:
    """The guest answers the host's n-th `time` line delays[n] seconds after it was written (a
    guest just restored under emulation is slow for a moment)."""
    reader, sink = asyncio.StreamReader(), Sink()
    ch = AgentChannel(reader, sink, "test")  # type: ignore[arg-type]
    ch.set_clock()
    for n, delay in enumerate(delays, 1):
        await answered(sink, n)
        await asyncio.sleep(delay)
        reader.feed_data(answer)
    confirmed = await asyncio.wait_for(ch.wait_clock(), 5)
    await ch.close()
    return confirmed, sink


def test_a_quick_answer_confirms_the_clock_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "CLOCK_ROUND_TRIP", 0.05)
    confirmed, sink = asyncio.run(clock_answered_after([0.0]))
    assert confirmed and len(times_sent(sink)) == 1


def test_a_slow_answer_sets_the_clock_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock was set as late as the answer came: the host sends its time again."""
    monkeypatch.setattr(agent, "CLOCK_ROUND_TRIP", 0.05)
    confirmed, sink = asyncio.run(clock_answered_after([0.2, 0.0]))
    assert confirmed and len(times_sent(sink)) == 2


def test_a_guest_slow_every_time_is_reported_not_retried_forever(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(agent, "CLOCK_ROUND_TRIP", 0.05)
    confirmed, sink = asyncio.run(clock_answered_after([0.1] * agent.CLOCK_TRIES))
    assert not confirmed and len(times_sent(sink)) == agent.CLOCK_TRIES
    assert "it may be that far behind" in caplog.text


def test_a_refused_time_is_not_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    confirmed, sink = asyncio.run(clock_answered_after([0.0], b"virby-error time\n"))
    assert not confirmed and len(times_sent(sink)) == 1
    assert "virby-error time" in caplog.text


def test_an_answer_to_an_earlier_time_does_not_confirm_the_latest() -> None:
    async def t() -> tuple[bool, bool]:
        reader, sink = asyncio.StreamReader(), Sink()
        ch = AgentChannel(reader, sink, "test")  # type: ignore[arg-type]
        ch.set_clock()
        ch.set_clock()  # a second resume before the guest answered the first
        reader.feed_data(b"virby-time-ok\n")
        for _ in range(5):  # the reader task takes the line
            await asyncio.sleep(0)
        early = ch.clock_set.is_set()
        reader.feed_data(b"virby-time-ok\n")
        confirmed = await asyncio.wait_for(ch.wait_clock(), 5)
        await ch.close()
        return early, confirmed

    early, confirmed = asyncio.run(t())
    assert not early and confirmed


def test_nothing_is_written_to_a_closed_channel() -> None:
    async def t() -> Sink:
        _, sink = await fed()
        return sink

    sink = asyncio.run(t())
    assert sink.data == b""


def test_pty_round_trip_in_raw_mode() -> None:
    """The guest side of a pty pair plays the agent. open_pty sets raw mode: a pty that still
    echoes would send the host's own lines back to it and the guest's back to the guest."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)  # as vfkit and QEMU leave it: the host opens the path

    async def t() -> tuple[AgentChannel, bytes]:
        ch = await agent.open_pty(path)
        greet = asyncio.create_task(ch.greet())
        loop = asyncio.get_running_loop()
        got = b""
        while b"hello\n" not in got:
            got += await loop.run_in_executor(None, os.read, master, 100)
        os.write(master, b"virby-ready 10.0.2.15\n")
        await asyncio.wait_for(greet, 5)
        await asyncio.wait_for(ch.ready.wait(), 5)
        ch.send("poweroff")
        got = b""
        while b"poweroff\n" not in got:
            got += await loop.run_in_executor(None, os.read, master, 100)
        await ch.close()
        return ch, got

    try:
        ch, got = asyncio.run(t())
    finally:
        os.close(master)
    assert ch.address == "10.0.2.15"
    assert got.endswith(b"poweroff\n")
    assert b"virby" not in got  # no echo of "virby-ready ..." back to the guest

