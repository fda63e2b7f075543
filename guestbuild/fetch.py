"""Downloads over plain http.client, verified by sha256 and size, cached by sha256.

A cache file is `<cache>/<sha256>.deb` and is only ever created by a rename after its hash was
checked, so a crash or a bad download never leaves a file there. A cached file is re-hashed
before use: a corrupted one is reported (and removed), never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 16
TIMEOUT = 30.0


class FetchError(Exception):
    """One line for the user: what failed, for which package, at which URL."""


def http_get(url: str, on_chunk: Callable[[bytes], None], redirects: int = 5) -> None:
    """GET `url`, passing the body to `on_chunk`. Raises FetchError on anything but a full 200."""
    u = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname or "", u.port, timeout=TIMEOUT)
    try:
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""),
                     headers={"User-Agent": "virby-guest", "Accept-Encoding": "identity"})
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308) and redirects > 0:
            location = resp.getheader("Location") or ""
            resp.read()
            return http_get(urllib.parse.urljoin(url, location), on_chunk, redirects - 1)
        if resp.status != 200:
            raise FetchError(f"HTTP {resp.status} {resp.reason}")
        expected = resp.getheader("Content-Length")
        got = 0
        while chunk := resp.read(CHUNK):
            got += len(chunk)
            on_chunk(chunk)
        if expected is not None and got != int(expected):
            raise FetchError(f"truncated download ({got} of {expected} bytes)")
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"cannot download: {e or type(e).__name__}") from e
    finally:
        conn.close()


def get_bytes(url: str) -> bytes:
    parts: list[bytes] = []
    http_get(url, parts.append)
    return b"".join(parts)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache: Path, sha256: str) -> Path:
    return cache / f"{sha256}.deb"


def cached(cache: Path, sha256: str, size: int, what: str) -> Path | None:
    """The verified cache file, None if absent. A corrupt one is removed and reported."""
    path = cache_path(cache, sha256)
    if not path.exists():
        return None
    if path.stat().st_size != size or sha256_file(path) != sha256:
        with contextlib.suppress(OSError):
            path.unlink()
        raise FetchError(f"{what}: the cached file {path} was corrupt (sha256 mismatch); "
                         "it is removed, run again to download it")
    return path


class _Sink:
    """Writes a download to its temp file, hashing it and counting progress on the way."""

    def __init__(self, file: BinaryIO, progress: Callable[[int], None]) -> None:
        self.file, self.progress, self.sha = file, progress, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.progress(len(data))


def download(urls: list[str], cache: Path, sha256: str, size: int, what: str,
             progress: Callable[[int], None] = lambda n: None) -> Path:
    """Fetch the first of `urls` that works into the cache; verify size and sha256."""
    path = cached(cache, sha256, size, what)
    if path is not None:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-")
        try:
            h = _Sink(os.fdopen(fd, "wb"), progress)
            with h.file:
                http_get(url, h.write)
                h.file.flush()
                os.fsync(h.file.fileno())
            got = os.path.getsize(tmp)
            if got != size:
                raise FetchError(f"truncated download ({got} of {size} bytes)")
            if h.sha.hexdigest() != sha256:
                raise FetchError(f"sha256 mismatch (got {h.sha.hexdigest()}, the lock says {sha256})")
            os.replace(tmp, cache_path(cache, sha256))
            return cache_path(cache, sha256)
        except FetchError as e:
            errors.append(f"{e} at {url}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    raise FetchError(f"{what}: " + "; ".join(errors))
