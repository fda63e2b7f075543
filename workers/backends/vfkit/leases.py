"""Find a guest's IP in macOS's DHCP lease file (`/var/db/dhcpd_leases`, written by bootpd).

Only a fallback: the guest announces its address over vsock. The file is a list of blocks:

    {
            name=virby-vm
            ip_address=192.168.64.3
            hw_address=1,2:94:a:b:c:d
            identifier=1,2:94:a:b:c:d
            lease=0x66a1b2c3
    }

bootpd writes MAC octets without leading zeros ("a", not "0a"), prefixed by the hardware type
("1," for Ethernet). Since macOS 15 a client that sends an RFC 4361 client id gets
`hw_address=ff,<iaid>:<duid>` and no MAC at all (vfkit#242); when that DUID is link-layer based
(DUID-LL or DUID-LLT) the MAC is its last six octets, which we still match. `lease` is the expiry
time (hex seconds): the newest match wins, since old leases of the same MAC linger.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LEASES_PATH = "/var/db/dhcpd_leases"


@dataclass(frozen=True)
class Lease:
    ip: str
    name: str | None
    hw_address: str | None
    identifier: str | None
    expires: int  # seconds since the epoch; 0 if the block had none


def parse_mac(text: str) -> bytes:
    """b'\\x02\\x94...' from "2:94:a:b:c:d" or "02:94:0a:0b:0c:0d" (any case)."""
    parts = text.strip().split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        octets = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
    if any(not 0 <= o <= 255 or not p for o, p in zip(octets, parts, strict=True)):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(octets)


def parse(text: str) -> list[Lease]:
    """Every well-formed block; malformed blocks are skipped (the file is bootpd's, not ours)."""
    leases: list[Lease] = []
    block: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line == "{":
            block = {}
        elif line == "}":
            if block is not None and (lease := _lease(block)) is not None:
                leases.append(lease)
            block = None
        elif block is not None and "=" in line:
            key, _, value = line.partition("=")
            block[key.strip()] = value.strip()
    return leases


def _lease(block: dict[str, str]) -> Lease | None:
    try:
        ip = str(ipaddress.IPv4Address(block.get("ip_address", "")))
    except ValueError:
        return None
    try:
        expires = int(block.get("lease", "0"), 16)
    except ValueError:
        expires = 0
    return Lease(ip=ip, name=block.get("name"), hw_address=block.get("hw_address"),
                 identifier=block.get("identifier"), expires=expires)


def _id_matches(value: str | None, mac: bytes) -> bool:
    """`1,<mac>` (Ethernet address) or `ff,<iaid:4><duid>` with a link-layer DUID."""
    if not value or "," not in value:
        return False
    kind, _, rest = value.partition(",")
    try:
        octets = bytes(int(p, 16) for p in rest.split(":")) if rest else b""
    except ValueError:
        return False
    kind = kind.strip().lower()
    if kind == "1":
        return octets == mac
    if kind == "ff" and len(octets) >= 4 + 4 + 6:
        duid = octets[4:]
        duid_type = int.from_bytes(duid[:2], "big")
        # DUID-LLT: type 1, hw type, time(4), MAC. DUID-LL: type 3, hw type, MAC.
        if duid_type == 1 and len(duid) == 2 + 2 + 4 + 6:
            return duid[8:] == mac
        if duid_type == 3 and len(duid) == 2 + 2 + 6:
            return duid[4:] == mac
    return False


def find_ip(text: str, mac: str) -> str | None:
    """The IP of the newest lease for `mac`, or None."""
    want = parse_mac(mac)
    matches = [lease for lease in parse(text)
               if _id_matches(lease.hw_address, want) or _id_matches(lease.identifier, want)]
    if not matches:
        return None
    return max(matches, key=lambda lease: lease.expires).ip


def lookup(mac: str, path: str = LEASES_PATH) -> str | None:
    """`find_ip` on the lease file; None if the file is missing or unreadable (no lease yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return find_ip(f.read(), mac)
    except OSError:
        return None
