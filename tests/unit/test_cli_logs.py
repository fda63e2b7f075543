"""`virby logs -f` across a real circus rotation: circus's FileStream renames vm.log to
vm.log.1 when it is full and starts a new file; the follower must print every line once, in
order, across the switch. The follower runs in a thread of this process; a stop ends it the way
Ctrl-C does (a KeyboardInterrupt at its next poll), and each test checks that it ended."""

from __future__ import annotations

import queue
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from circus.stream import FileStream

from virby.core import logtail
from virby.supervisor import logview


class Polls:
    """Stands in for logview's `time`: each poll's sleep runs `between` (once, if set), then
    waits for the poll interval or for `stop()`, which ends the follower like Ctrl-C."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.between: Callable[[], None] | None = None

    def sleep(self, seconds: float) -> None:
        if self.between is not None:
            action, self.between = self.between, None
            action()
        if self.stopped.wait(seconds):
            raise KeyboardInterrupt

    def stop(self) -> None:
        self.stopped.set()


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> Polls:
    p = Polls()
    monkeypatch.setattr(logview, "time", types.SimpleNamespace(sleep=p.sleep))
    return p


@pytest.fixture
def follower(polls: Polls) -> Iterator[Callable[[Callable[[], None]], threading.Thread]]:
    """Start a follow in a thread; at the end stop it and check that it ended."""
    threads: list[threading.Thread] = []

    def start(target: Callable[[], None]) -> threading.Thread:
        t = threading.Thread(target=target, daemon=True)
        t.start()
        threads.append(t)
        return t

    yield start
    polls.stop()
    for t in threads:
        t.join(5)
        assert not t.is_alive(), "the follower did not end on Ctrl-C"


def test_tail_lines_stops_at_the_given_offset(tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_bytes(b"a\nb\nc\nd\n")
    assert logtail.tail_lines(str(p), 2) == ["c", "d"]
    assert logtail.tail_lines(str(p), 2, end=4) == ["a", "b"]
    assert logtail.tail_lines(str(p), 0) == []
    assert logtail.tail_lines(str(tmp_path / "missing"), 3) == []


def test_logs_follow_across_circus_rotation(tmp_path: Path, follower) -> None:
    log = tmp_path / "vm.log"
    stream = FileStream(filename=str(log), max_bytes=400, backup_count=3)
    stream({"data": b"before-0\n"})
    q: queue.Queue[str] = queue.Queue()
    # what `virby logs -f -n 1 vm` runs
    follower(lambda: logview.show({"vm": str(log)}, lines=1, follow=True, echo=q.put))
    assert q.get(timeout=15) == "before-0"  # the tail: from here on the follower is attached
    for i in range(60):  # 60 x ~16 bytes = several rotations at 400 bytes
        stream({"data": f"line-{i:04d}-xxxxx\n".encode()})
    stream.close()
    assert (tmp_path / "vm.log.1").exists()  # it really rotated
    got = [q.get(timeout=15) for _ in range(60)]
    assert got == [f"line-{i:04d}-xxxxx" for i in range(60)]
    with pytest.raises(queue.Empty):
        q.get(timeout=2 * logview.POLL)  # and nothing twice


def test_follow_picks_up_lines_written_just_before_a_rename(tmp_path: Path, polls: Polls,
                                                           follower) -> None:
    """The race the reader must not lose: bytes land in the old file, then it is renamed and a
    new one created, all between two polls."""
    log = tmp_path / "f.log"
    log.write_bytes(b"")
    seen: queue.Queue[str] = queue.Queue()

    def rotate() -> None:
        with open(log, "ab") as f:
            f.write(b"old-1\nold-2\n")
        log.rename(tmp_path / "f.log.1")
        log.write_bytes(b"new-1\n")

    polls.between = rotate  # at the follower's first poll, after it read the empty file
    fh: BinaryIO = open(log, "rb")  # noqa: SIM115 - closed by _follow
    files = {"f": (fh, log.stat().st_ino)}
    follower(lambda: logview._follow({"f": str(log)}, files, False, seen.put))
    assert [seen.get(timeout=10) for _ in range(3)] == ["old-1", "old-2", "new-1"]
