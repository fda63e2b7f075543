"""A tiny writer for newc ("070701") cpio archives: the format the kernel unpacks as initramfs.

The qemu backend uses it to hand the guest its keys at boot: it appends a small uncompressed
archive to the image's gzip initrd, and the kernel unpacks the concatenated archives in order,
so no image ever holds a key; the guest builder packs whole images with it. Regular files,
directories and symbolic links; no hard links, no device nodes. Output is deterministic
(mtime 0, inode numbers counted from 1).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `path` is relative to the archive root ("etc/virby/user"); a leading
    "/" or "./" is dropped. `mode` holds the permission bits only (the type comes from
    `directory` or `symlink`). A symlink's `data` is its target."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    directory: bool = False
    symlink: bool = False

    def __post_init__(self) -> None:
        if self.directory and (self.data or self.symlink):
            raise ValueError(f"{self.path}: a directory has no data")
        if self.symlink and not self.data:
            raise ValueError(f"{self.path}: a symlink needs a target")
        if self.mode & ~0o7777:
            raise ValueError(f"{self.path}: mode {self.mode:o} has bits beyond 0o7777")
        _normalise(self.path)  # fail at construction, not when writing


def _normalise(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path {path!r}")
    return "/".join(parts)


def _align4(n: int) -> int:
    return (4 - n % 4) % 4


def _member(name: str, ino: int, mode: int, uid: int, gid: int, nlink: int, data: bytes) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, uid, gid, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    # the name is padded so that header + name ends on a 4-byte boundary, and so is the data
    out = header + encoded + b"\0" * _align4(len(header) + len(encoded))
    return out + data + b"\0" * _align4(len(data))


def newc_archive(entries: list[CpioEntry]) -> bytes:
    """The archive for `entries`, in their order, except that every parent directory comes
    before anything inside it: a parent that is not listed is added (0755, root), a listed one
    is moved up. Ends with the TRAILER!!! member. Raises ValueError on a duplicate path or on a
    file used as a parent."""
    by_path: dict[str, CpioEntry] = {}
    for e in entries:
        p = _normalise(e.path)
        if p in by_path:
            raise ValueError(f"duplicate archive path {p!r}")
        by_path[p] = e

    out: list[bytes] = []
    emitted: set[str] = set()

    def emit(path: str, entry: CpioEntry) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            given = by_path.get(parent)
            if given is not None and not given.directory:  # (a symlink too: no paths through one)
                raise ValueError(f"{parent!r} is a file but {path!r} is inside it")
            if parent in emitted:
                continue
            emit(parent, given or CpioEntry(parent, mode=0o755, directory=True))
        kind = stat.S_IFDIR if entry.directory else stat.S_IFLNK if entry.symlink else stat.S_IFREG
        nlink = 2 if entry.directory else 1
        out.append(_member(path, len(emitted) + 1, kind | entry.mode, entry.uid, entry.gid,
                           nlink, entry.data))
        emitted.add(path)

    for path, entry in by_path.items():
        if path not in emitted:
            emit(path, entry)
    out.append(_member(_TRAILER, 0, 0, 0, 0, 1, b""))
    return b"".join(out)


def append_archive(base_initrd_path: str, extra: bytes, out_path: str) -> None:
    """Write `base_initrd_path` followed by `extra` to `out_path`, atomically (a temp file in
    the same directory, then rename), so a booting VM never reads a half-written initrd.

    The base is padded with NULs to a multiple of 4 bytes: after a compressed archive the kernel
    skips NULs, but takes a "0" that is not 4-byte aligned for the start of another compressed
    archive and fails with "invalid magic at start of compressed archive".
    """
    out_dir = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".initrd.")
    try:
        with os.fdopen(fd, "wb") as out, open(base_initrd_path, "rb") as base:
            size = 0
            while chunk := base.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
            out.write(b"\0" * _align4(size))
            out.write(extra)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp made it 0600, which it keeps: it carries the guest's private host key
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
