"""`virby logs -f` across a real circus rotation: circus's FileStream renames vm.log to
vm.log.1 when it is full and starts a new file; the follower must print every line once, in
order, across the switch."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from circus.stream import FileStream

from virby.supervisor import logview
from virby.workers import logtail


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stateDir": str(tmp_path / "s"), "runtimeDir": str(tmp_path / "r"),
                                "port": 40000}))
    (tmp_path / "s" / "logs").mkdir(parents=True)
    return path


def test_tail_lines_stops_at_the_given_offset(tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_bytes(b"a\nb\nc\nd\n")
    assert logtail.tail_lines(str(p), 2) == ["c", "d"]
    assert logtail.tail_lines(str(p), 2, end=4) == ["a", "b"]
    assert logtail.tail_lines(str(p), 0) == []
    assert logtail.tail_lines(str(tmp_path / "missing"), 3) == []


def test_logs_follow_across_circus_rotation(tmp_path: Path) -> None:
    config = _config(tmp_path)
    log = tmp_path / "s" / "logs" / "vm.log"
    stream = FileStream(filename=str(log), max_bytes=400, backup_count=3)
    stream({"data": b"before-0\n"})
    proc = subprocess.Popen([sys.executable, "-m", "virby.supervisor.cli", "logs", "-f", "-n", "1", "vm",
                             "--config", str(config)], stdout=subprocess.PIPE, text=True)
    q: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    def reader() -> None:
        for x in out:
            q.put(x.rstrip("\n"))

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert q.get(timeout=15) == "before-0"  # the tail: the follower is attached
        for i in range(60):  # 60 x ~16 bytes = several rotations at 400 bytes
            stream({"data": f"line-{i:04d}-xxxxx\n".encode()})
        stream.close()
        assert (tmp_path / "s" / "logs" / "vm.log.1").exists()  # it really rotated
        got: list[str] = []
        deadline = time.monotonic() + 20
        while len(got) < 60 and time.monotonic() < deadline:
            try:
                got.append(q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        assert got == [f"line-{i:04d}-xxxxx" for i in range(60)]
    finally:
        proc.terminate()
        proc.wait(10)


def test_follow_picks_up_lines_written_just_before_a_rename(tmp_path: Path) -> None:
    """The race the reader must not lose: bytes land in the old file, then it is renamed and a
    new one created, all between two polls."""
    log = tmp_path / "f.log"
    log.write_bytes(b"")
    seen: list[str] = []
    done = threading.Event()

    def echo(line: str) -> None:
        seen.append(line)
        if line == "new-1":
            done.set()

    def writer() -> None:
        time.sleep(logview.POLL * 2)  # let the follower attach (it opened the file before this)
        with open(log, "ab") as f:
            f.write(b"old-1\nold-2\n")
        log.rename(tmp_path / "f.log.1")
        log.write_bytes(b"new-1\n")

    fh: BinaryIO = open(log, "rb")  # noqa: SIM115 - closed by _follow
    files = {"f": (fh, log.stat().st_ino)}
    threading.Thread(target=writer, daemon=True).start()

    def run() -> None:
        logview._follow({"f": str(log)}, files, False, echo)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(10), seen
    assert seen == ["old-1", "old-2", "new-1"]
