"""Print the tail of log files and follow them across circus's size-based rotation (the file
is renamed to `.1` and a new one created: we notice the new inode and reopen)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

from virby.core.logtail import tail_lines

POLL = 0.25


def show(paths: dict[str, str], *, lines: int, follow: bool, echo: Callable[[str], None]) -> None:
    prefix = len(paths) > 1
    # Open before printing the tail: following then starts exactly where the tail ended, so
    # no line written meanwhile falls between the two.
    files: dict[str, tuple[BinaryIO, int]] = {}
    for name, path in paths.items():
        try:
            fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - kept open while following
        except OSError:
            if not follow:
                echo(f"[{name}] (no log yet at {path})")
            continue
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        for line in tail_lines(path, lines, end):
            echo(f"[{name}] {line}" if prefix else line)
        if follow:
            fh.seek(end)
            files[name] = (fh, os.fstat(fh.fileno()).st_ino)
        else:
            fh.close()
    if follow:
        _follow(paths, files, prefix, echo)


def _rotated_since(path: str, old_ino: int, limit: int = 100) -> list[str]:
    """The backups (`path.1` newest, `path.2`, …) written after the file with inode `old_ino`,
    oldest first; none if that file is no longer among them (we cannot tell what is new)."""
    newer: list[str] = []
    for n in range(1, limit):
        backup = f"{path}.{n}"
        try:
            ino = os.stat(backup).st_ino
        except OSError:
            return []
        if ino == old_ino:
            return list(reversed(newer))
        newer.append(backup)
    return []


def _follow(paths: dict[str, str], files: dict[str, tuple[BinaryIO, int]], prefix: bool,
            echo: Callable[[str], None]) -> None:
    pending: dict[str, bytes] = {}

    def drain(name: str, f: BinaryIO) -> None:
        chunk = f.read()
        if not chunk:
            return
        buf = pending.get(name, b"") + chunk
        *complete, rest = buf.split(b"\n")
        pending[name] = rest
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            echo(f"[{name}] {line}" if prefix else line)

    try:
        while True:
            for name, path in paths.items():
                entry = files.get(name)
                if entry is not None:
                    drain(name, entry[0])
                try:
                    ino = os.stat(path).st_ino
                except OSError:
                    continue
                if entry is None or entry[1] != ino:  # rotated or created: read the new file
                    if entry is not None:
                        # Lines written between our last read and the rename are in the old
                        # file (now `.1`): finish it before switching. A burst may have rotated
                        # more than once since: read the backups newer than it, oldest first.
                        drain(name, entry[0])
                        entry[0].close()
                        for between in _rotated_since(path, entry[1]):
                            try:
                                with open(between, "rb") as fb:
                                    drain(name, fb)
                            except OSError:
                                pass
                    try:
                        files[name] = (open(path, "rb"), ino)  # noqa: SIM115
                    except OSError:
                        files.pop(name, None)
                        continue
                    drain(name, files[name][0])
            time.sleep(POLL)
    except KeyboardInterrupt:
        pass
    finally:
        for fh, _ in files.values():
            fh.close()
