"""The last lines of a log file, read from its end (logs grow without bound; reasons and
`virby logs` want only the tail)."""

from __future__ import annotations

import os


def tail_lines(path: str, lines: int, end: int | None = None) -> list[str]:
    """The last `lines` lines of `path` before offset `end` (default: its end); [] if the file
    cannot be read. Reads about 256 bytes a line, so very long lines may come back cut."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            if end is None:
                end = f.seek(0, os.SEEK_END)
            start = max(0, end - 256 * lines - 4096)
            f.seek(start)
            data = f.read(end - start).decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]


def last_line(path: str, default: str = "no output") -> str:
    """The last non-blank line of `path`, stripped: a one-line reason for a failure."""
    found = [line.strip() for line in tail_lines(path, 20) if line.strip()]
    return found[-1] if found else default
