"""The guest lock file (`image/guest.lock.json`): read, validate, write."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virby.guestbuild.spec import ARCHES, DEFAULT_LOCK, VARIANTS

VERSION = 1


class LockError(Exception):
    pass


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    path: str
    urls: tuple[str, ...]
    sha256: str
    size: int
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    image: str  # tree path of the kernel image in that package
    modules: str  # tree path of its modules dir


@dataclass(frozen=True)
class ArchLock:
    debArch: str
    kernel: Kernel
    packages: tuple[Package, ...]

    def for_variant(self, variant: str) -> list[Package]:
        return [p for p in self.packages if variant in p.variants]


@dataclass(frozen=True)
class Lock:
    suite: str
    snapshot: str
    arches: dict[str, ArchLock]
    sha256: str = ""  # of the file's bytes, for the manifest


def _req(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise LockError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LockError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _package(raw: Any, where: str) -> Package:
    name = _req(raw, "name", str, where)
    where = f"{where} ({name})"
    sha = _req(raw, "sha256", str, where)
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise LockError(f"{where}.sha256: not 64 lowercase hex digits: {sha!r}")
    urls = _req(raw, "urls", list, where)
    if not urls or not all(isinstance(u, str) and "://" in u for u in urls):
        raise LockError(f"{where}.urls: expected a non-empty list of URLs")
    variants = _req(raw, "variants", list, where)
    if not variants or not set(variants) <= set(VARIANTS):
        raise LockError(f"{where}.variants: expected some of {list(VARIANTS)}, got {variants!r}")
    size = _req(raw, "size", int, where)
    if size <= 0:
        raise LockError(f"{where}.size: must be positive")
    path = _req(raw, "path", str, where)
    if path.startswith("/") or ".." in path.split("/"):
        raise LockError(f"{where}.path: must be relative: {path!r}")
    return Package(name, _req(raw, "version", str, where), _req(raw, "arch", str, where), path,
                   tuple(urls), sha, size, tuple(variants))


def parse(text: str | bytes) -> Lock:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise LockError(f"not JSON: {e}") from e
    if _req(raw, "version", int, "lock") != VERSION:
        raise LockError(f"lock.version: this Virby reads version {VERSION}, not {raw['version']}")
    arches: dict[str, ArchLock] = {}
    for arch, a in _req(raw, "arches", dict, "lock").items():
        where = f"arches.{arch}"
        if arch not in ARCHES:
            raise LockError(f"{where}: unknown arch (known: {', '.join(ARCHES)})")
        k = _req(a, "kernel", dict, where)
        kernel = Kernel(*(_req(k, f, str, f"{where}.kernel")
                          for f in ("package", "version", "image", "modules")))
        pkgs = tuple(_package(p, f"{where}.packages[{i}]")
                     for i, p in enumerate(_req(a, "packages", list, where)))
        names = [p.name for p in pkgs]
        if names != sorted(set(names)):
            raise LockError(f"{where}.packages: must be sorted by name, without duplicates")
        if kernel.package not in names:
            raise LockError(f"{where}.kernel: package {kernel.package} is not in the package list")
        arches[arch] = ArchLock(_req(a, "debArch", str, where), kernel, pkgs)
    data = text.encode() if isinstance(text, str) else text
    return Lock(_req(raw, "suite", str, "lock"), _req(raw, "snapshot", str, "lock"), arches,
                hashlib.sha256(data).hexdigest())


def load(path: Path = DEFAULT_LOCK) -> Lock:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LockError(f"cannot read the lock {path}: {e.strerror}") from e
    try:
        return parse(data)
    except LockError as e:
        raise LockError(f"{path}: {e}") from e


def dumps(lock: Lock) -> str:
    def pkg(p: Package) -> dict[str, Any]:
        d = asdict(p)
        d["urls"], d["variants"] = list(p.urls), list(p.variants)
        return d
    doc = {
        "version": VERSION, "suite": lock.suite, "snapshot": lock.snapshot,
        "arches": {arch: {"debArch": a.debArch, "kernel": asdict(a.kernel),
                          "packages": [pkg(p) for p in a.packages]}
                   for arch, a in sorted(lock.arches.items())},
    }
    return json.dumps(doc, indent=1) + "\n"
