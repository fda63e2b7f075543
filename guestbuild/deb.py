"""Unpack a `.deb` in memory: the `ar` archive, then `data.tar` in xz, zstd or gzip.

No dpkg and no filesystem: the files land in a `Tree` (path -> node), so ownership, device
nodes or a case-insensitive disk (macOS) never matter, and the result is the same everywhere.
"""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from dataclasses import dataclass

import zstandard


class DebError(Exception):
    pass


@dataclass(frozen=True)
class Node:
    kind: str  # "file", "dir" or "link"
    data: bytes = b""  # file content, or the link target
    mode: int = 0o644  # permission bits

    @property
    def target(self) -> str:
        return self.data.decode()


Tree = dict[str, Node]  # "usr/bin/nix" -> Node (no leading "/" or "./")


def ar_members(blob: bytes) -> dict[str, bytes]:
    if not blob.startswith(b"!<arch>\n"):
        raise DebError("not an ar archive")
    out: dict[str, bytes] = {}
    pos = 8
    while pos < len(blob):
        header = blob[pos:pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DebError("truncated or corrupt ar header")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = blob[pos + 60:pos + 60 + size]
        if len(data) != size:
            raise DebError(f"ar member {name} is truncated")
        out[name] = data
        pos += 60 + size + (size & 1)
    return out


def _decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name.endswith(".gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if name.endswith(".tar"):
        return data
    raise DebError(f"unknown compression of {name}")


def clean(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def unpack(blob: bytes, into: Tree | None = None) -> Tree:
    """The files of the .deb `blob`'s data.tar, added to `into` (later ones win)."""
    tree: Tree = {} if into is None else into
    members = ar_members(blob)
    data_names = [n for n in members if n.startswith("data.tar")]
    if members.get("debian-binary", b"")[:2] != b"2." or len(data_names) != 1:
        raise DebError("not a Debian binary package")
    try:
        raw = _decompress(data_names[0], members[data_names[0]])
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for m in tar:
                path = clean(m.name)
                if not path:
                    continue
                if m.isdir():
                    tree[path] = Node("dir", mode=m.mode & 0o7777)
                elif m.issym():
                    tree[path] = Node("link", m.linkname.encode(), 0o777)
                elif m.islnk():
                    src = tree.get(clean(m.linkname))
                    if src is None:
                        raise DebError(f"hard link {path} to a missing {m.linkname}")
                    tree[path] = Node("file", src.data, m.mode & 0o7777)
                elif m.isreg():
                    f = tar.extractfile(m)
                    assert f is not None
                    tree[path] = Node("file", f.read(), m.mode & 0o7777)
    except (lzma.LZMAError, zstandard.ZstdError, zlib.error, tarfile.TarError, EOFError) as e:
        raise DebError(f"corrupt data archive: {e}") from e
    return tree
