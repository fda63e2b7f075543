"""What vfkit's command line names, made before a boot besides the data disk (backends/disk.py):
the install's MAC and the guest's key share. Each is idempotent and keeps what a user has."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets

from virby.core.config import Config
from virby.core.files import write_atomic, write_if_changed
from virby.core.keys import KeyPaths

log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def ensure_mac(path: str) -> str:
    """The install's MAC: read from `path`, or made once (locally administered, unicast)."""
    try:
        with open(path) as f:
            mac = f.read().strip().lower()
        if _MAC_RE.match(mac) and int(mac[:2], 16) & 0b11 == 0b10:
            return mac
        log.warning("%s holds %r, not a locally administered MAC; making a new one", path, mac)
    except FileNotFoundError:
        pass
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0b11111100) | 0b10
    mac = ":".join(f"{o:02x}" for o in octets)
    write_atomic(path, (mac + "\n").encode(), 0o644)
    return mac


def fill_guest_keys(keys_dir: str, keys: KeyPaths, c: Config) -> None:
    """The guest's key share (virtio-fs tag virby-keys), rewritten only where it changed."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    with open(keys.host_key, "rb") as f:
        host_key = f.read()
    with open(keys.client_pub, "rb") as f:
        authorized = f.read()
    # Besides keys, the settings the guest applies at boot, so that changing them never
    # needs a new guest image: the shares to mount and whether to register Rosetta.
    wanted = {
        "ssh_host_ed25519_key": host_key,
        "authorized_keys": authorized,
        "user": (c.sshUser + "\n").encode(),
        "shares": "".join(f"{tag}\n" for tag in sorted(c.sharedDirectories)).encode(),
    }
    rosetta_flag = os.path.join(keys_dir, "rosetta")
    if c.rosetta:
        wanted["rosetta"] = b"rosetta\n"
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rosetta_flag)
    for name, data in wanted.items():
        write_if_changed(os.path.join(keys_dir, name), data, 0o600)
