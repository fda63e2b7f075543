"""The keyed initrd: the guest's base initrd with this install's keys appended as a cpio
archive (the kernel unpacks concatenated archives in order), rebuilt at every boot."""

from __future__ import annotations

from virby.workers import cpio
from virby.workers.keys import KeyPaths


def keys_archive(keys: KeyPaths, ssh_user: str) -> bytes:
    """/etc/virby as the guest reads it: its host key, the client's public key, the user."""
    with open(keys.host_key_dropbear, "rb") as f:
        host_key = f.read()
    with open(keys.client_pub, "rb") as f:
        client_pub = f.read()
    return cpio.newc_archive([
        cpio.CpioEntry("etc", mode=0o755, directory=True),
        cpio.CpioEntry("etc/virby", mode=0o700, directory=True),
        cpio.CpioEntry("etc/virby/ssh_host_ed25519_key", data=host_key, mode=0o600),
        cpio.CpioEntry("etc/virby/authorized_keys", data=client_pub, mode=0o644),
        cpio.CpioEntry("etc/virby/user", data=ssh_user.encode() + b"\n", mode=0o644),
    ])


def build_keyed_initrd(base: str, keys: KeyPaths, ssh_user: str, out: str) -> None:
    """Write `base` + the keys archive to `out` (copied and fsynced: run it off the loop)."""
    cpio.append_archive(base, keys_archive(keys, ssh_user), out)
