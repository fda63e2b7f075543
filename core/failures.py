"""The crash record a watcher leaves in `<runtimeDir>/<name>.failure` when it fails, read by
`virby status`. Written by workers/runtime.py; kept apart so the CLI reads it without importing
asyncio."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from virby.core.config import Config
from virby.core.files import write_json
from virby.core.protocol import failure_file

MAX_BACKOFF = 60.0

log = logging.getLogger("virby")


def failure_path(config: Config, name: str) -> str:
    return config.runtime(failure_file(name))


def read_failure(config: Config, name: str) -> dict[str, object] | None:
    try:
        with open(failure_path(config, name)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def record_failure(config: Config, name: str, reason: str) -> float:
    """Count this failure; return how long to wait before exiting."""
    previous = read_failure(config, name) or {}
    count_before = previous.get("count")
    count = count_before + 1 if isinstance(count_before, int) else 1
    delay = min(MAX_BACKOFF, 2.0 ** (count - 1))
    record = {"count": count, "reason": reason[-2000:], "time": time.time(), "backoff": delay}
    try:
        write_json(failure_path(config, name), record)
    except OSError as e:  # a full disk must not stop the backoff itself
        log.error("could not record the failure: %s", e)
    return delay


def clear_failure(config: Config, name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        os.unlink(failure_path(config, name))
