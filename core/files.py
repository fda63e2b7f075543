"""Writing state files so that a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file next to `path` (created with `mode`), fsync, rename over
    `path`. On any error the temp file is removed and `path` is left as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_if_changed(path: str, data: bytes, mode: int = 0o644) -> bool:
    """`write_atomic` unless `path` already holds exactly `data`; True if it wrote."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except FileNotFoundError:
        pass
    write_atomic(path, data, mode)
    return True


def write_json(path: str, value: Any, mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(value).encode(), mode)
