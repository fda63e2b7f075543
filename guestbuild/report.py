"""Progress of a guest build: on a terminal one redrawn line per step (a bar where the step can
count), ending `✓ step (1.2s)`; otherwise (a pipe, CI, tests) one plain line per step."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Report:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.label = ""
        self.t0 = 0.0
        self.last_draw = 0.0

    def step(self, label: str) -> None:
        self.end()
        self.label, self.t0 = label, time.monotonic()
        if self.tty:
            self._draw("")
        else:
            self.stream.write(f"{label}…\n")
            self.stream.flush()

    def tick(self, done: int, total: int, unit: str = "") -> None:
        now = time.monotonic()
        if not self.tty or (now - self.last_draw < 0.1 and done < total):
            return
        self.last_draw = now
        n = int(20 * done / total) if total else 20
        counts = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if unit == "MB" else f"{done}/{total}"
        self._draw(f" [{'#' * n}{'-' * (20 - n)}] {counts}")

    def _draw(self, extra: str) -> None:
        self.stream.write(f"\r\033[K{self.label}{extra} {time.monotonic() - self.t0:.1f}s")
        self.stream.flush()

    def end(self, ok: bool = True) -> None:
        if not self.label:
            return
        if self.tty:
            mark = "✓" if ok else "✗"
            self.stream.write(f"\r\033[K{mark} {self.label} ({time.monotonic() - self.t0:.1f}s)\n")
            self.stream.flush()
        self.label = ""

    def say(self, line: str) -> None:
        if self.tty and self.label:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()
