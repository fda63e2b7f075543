"""Where `mirror://debian/…` and `snapshot://debian/…` URLs point, decided at run time.

No host name is written into the lock or the code: `--mirror`, else $VIRBY_DEBIAN_MIRROR, else
the host's apt sources. Security updates live in a second archive (`mirror://debian-security/`):
$VIRBY_DEBIAN_SECURITY_MIRROR, else apt's `…-security` line, else the main mirror's base with
`-security` appended (Debian's own layout). Snapshots: $VIRBY_DEBIAN_SNAPSHOT (a base URL).
"""

from __future__ import annotations

import glob
import os
import re


class MirrorError(Exception):
    pass


APT_SOURCES = ("/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
               *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")))


def apt_uris(files: tuple[str, ...] = APT_SOURCES) -> list[tuple[str, str]]:
    """(uri, suites) of every `deb` source, in the order apt reads them."""
    out = []
    for path in files:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", block, re.M))
                if "deb" in fields.get("Types", "").split():
                    out += [(u, fields.get("Suites", "")) for u in fields.get("URIs", "").split()]
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    out.append((m.group(1), m.group(2)))
    return out


def _http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def bases(mirror: str | None = None, files: tuple[str, ...] = APT_SOURCES) -> dict[str, str]:
    """{"debian": base URL, "debian-security": base URL}, without trailing slashes."""
    sources = [(u.rstrip("/"), s) for u, s in apt_uris(files) if _http(u)]
    main = mirror or os.environ.get("VIRBY_DEBIAN_MIRROR")
    if not main:
        main = next((u for u, s in sources if "security" not in u and "security" not in s), None)
    if not main:
        raise MirrorError("no Debian mirror: pass --mirror URL or set VIRBY_DEBIAN_MIRROR "
                          "(no usable `deb` line in the apt sources)")
    main = main.rstrip("/")
    security = os.environ.get("VIRBY_DEBIAN_SECURITY_MIRROR") or next(
        (u for u, s in sources if "security" in u or "security" in s), None) or main + "-security"
    return {"debian": main, "debian-security": security.rstrip("/")}


def resolve(url: str, mirrors: dict[str, str]) -> str | None:
    """The http(s) URL for a lock URL, or None when its scheme has no base here."""
    m = re.match(r"mirror://([a-z-]+)/(.*)", url)
    if m:
        base = mirrors.get(m.group(1))
        return f"{base}/{m.group(2)}" if base else None
    m = re.match(r"snapshot://([a-z-]+)/(.*)", url)
    if m:
        snap = os.environ.get("VIRBY_DEBIAN_SNAPSHOT")
        return f"{snap.rstrip('/')}/archive/{m.group(1)}/{m.group(2)}" if snap else None
    return url if _http(url) else None
