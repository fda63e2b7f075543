"""The keyed initrd both backends boot: the guest's initrd with this install's keys appended as
a cpio archive (workers/keys.py guest_keys_archive; the kernel unpacks concatenated archives in
order, so no image ever holds a key). Remade at every boot in the runtime dir, mode 0600: it
holds the guest's private host key; the backend removes it when the VM ends."""

from __future__ import annotations

from virby.workers import cpio
from virby.workers.keys import KeyPaths, guest_keys_archive


def build_keyed_initrd(base: str, keys: KeyPaths, ssh_user: str, out: str) -> None:
    """Write `base` + the keys archive to `out` (tens of MB copied and fsynced: run it off the
    event loop)."""
    cpio.append_archive(base, guest_keys_archive(keys, ssh_user), out)
