"""Debian `Packages` indexes: parsing, version order, and which package a name resolves to.

Only what the locker needs: one stanza per package version, `Depends`/`Pre-Depends` as plain
names (alternatives flattened, version constraints dropped: the closure is decided by the ELF
files, the Depends only say where to look), and dpkg's version comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FIELDS = ("Package", "Version", "Architecture", "Filename", "Size", "SHA256", "Depends",
           "Pre-Depends", "Provides")


@dataclass(frozen=True)
class Stanza:
    name: str
    version: str
    arch: str
    path: str  # pool path, relative to the archive root
    size: int
    sha256: str
    depends: tuple[str, ...]
    origin: str  # which index it came from ("main", "security")
    provides: tuple[str, ...] = field(default=())


def _names(value: str) -> tuple[str, ...]:
    """`a (>= 1), b | c:any` -> ("a", "b", "c")."""
    out = []
    for part in re.split(r"[,|]", value):
        name = part.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0]
        if name:
            out.append(name)
    return tuple(out)


def parse(text: str, origin: str) -> list[Stanza]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key] += "\n" + line.strip()
                continue
            key, sep, value = line.partition(":")
            if not sep:
                key = None
                continue
            fields[key] = value.strip()
        if "Package" not in fields:
            continue
        missing = [f for f in ("Version", "Filename", "Size", "SHA256") if f not in fields]
        if missing:
            raise ValueError(f"index stanza for {fields['Package']} lacks {', '.join(missing)}")
        out.append(Stanza(
            name=fields["Package"], version=fields["Version"],
            arch=fields.get("Architecture", "all"), path=fields["Filename"],
            size=int(fields["Size"]), sha256=fields["SHA256"].lower(),
            depends=_names(fields.get("Pre-Depends", "")) + _names(fields.get("Depends", "")),
            origin=origin, provides=_names(fields.get("Provides", ""))))
    return out


class Index:
    """The newest version of each package over several indexes (main and security)."""

    def __init__(self, stanzas: list[Stanza]) -> None:
        self.by_name: dict[str, Stanza] = {}
        self.providers: dict[str, list[str]] = {}
        for s in stanzas:
            cur = self.by_name.get(s.name)
            if cur is None or compare(s.version, cur.version) > 0:
                self.by_name[s.name] = s
        for s in self.by_name.values():
            for p in s.provides:
                self.providers.setdefault(p, []).append(s.name)

    def get(self, name: str) -> Stanza:
        """The package `name`, or the one real package that provides it."""
        if name in self.by_name:
            return self.by_name[name]
        providers = sorted(self.providers.get(name, []))
        if len(providers) == 1:
            return self.by_name[providers[0]]
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except KeyError:
            return False
        return True


# -- dpkg version comparison (deb-version(7)) ------------------------------------------------------

def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0), upstream, revision


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"[^0-9]*", a).group()  # type: ignore[union-attr]
        nb = re.match(r"[^0-9]*", b).group()  # type: ignore[union-attr]
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"[0-9]*", a).group()  # type: ignore[union-attr]
        db = re.match(r"[0-9]*", b).group()  # type: ignore[union-attr]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return -1 if ia < ib else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as dpkg orders the versions `a` and `b`."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)
