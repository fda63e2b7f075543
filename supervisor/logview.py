"""Print the tail of log files and follow them across circus's size-based rotation (the file
is renamed to `.1` and a new one created: we notice the new inode and reopen)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

POLL = 0.25


def tail_lines(path: str, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * max(lines, 1) - 4096))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = data.splitlines()
    return out[-lines:] if lines > 0 else []


def show(paths: dict[str, str], *, lines: int, follow: bool, echo: Callable[[str], None]) -> None:
    prefix = len(paths) > 1
    for name, path in paths.items():
        if not os.path.exists(path):
            if not follow:
                echo(f"[{name}] (no log yet at {path})")
            continue
        for line in tail_lines(path, lines):
            echo(f"[{name}] {line}" if prefix else line)
    if follow:
        _follow(paths, prefix, echo)


def _follow(paths: dict[str, str], prefix: bool, echo: Callable[[str], None]) -> None:
    files: dict[str, tuple[BinaryIO, int]] = {}
    for name, path in paths.items():
        try:
            fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - kept open while following
            fh.seek(0, os.SEEK_END)
            files[name] = (fh, os.fstat(fh.fileno()).st_ino)
        except OSError:
            pass
    pending: dict[str, bytes] = {}
    try:
        while True:
            for name, path in paths.items():
                entry = files.get(name)
                if entry is not None:
                    f, _ = entry
                    chunk = f.read()
                    if chunk:
                        buf = pending.get(name, b"") + chunk
                        *complete, rest = buf.split(b"\n")
                        pending[name] = rest
                        for raw in complete:
                            line = raw.decode("utf-8", "replace")
                            echo(f"[{name}] {line}" if prefix else line)
                try:
                    ino = os.stat(path).st_ino
                except OSError:
                    continue
                if entry is None or entry[1] != ino:  # rotated or created: read the new file
                    if entry is not None:
                        entry[0].close()
                    try:
                        files[name] = (open(path, "rb"), ino)  # noqa: SIM115
                    except OSError:
                        files.pop(name, None)
            time.sleep(POLL)
    except KeyboardInterrupt:
        pass
    finally:
        for fh, _ in files.values():
            fh.close()
