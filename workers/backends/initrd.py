"""The keyed initrd both backends boot: the guest's initrd with this install's keys appended as
a cpio archive (core/keys.py guest_keys_archive; the kernel unpacks concatenated archives in
order, so no image ever holds a key). Remade at every boot in the runtime dir, mode 0600: it
holds the guest's private host key; the backend removes it when the VM ends."""

from __future__ import annotations

from virby.core import cpio
from virby.core.config import Config
from virby.core.keys import KeyPaths, guest_keys_archive
from virby.workers.guestconf import guest_nix_conf


def build_keyed_initrd(config: Config, keys: KeyPaths, out: str) -> None:
    """Write the config's guest initrd + the keys archive (keys, login user, the guest Nix's
    settings) to `out` (tens of MB copied and fsynced: run it off the event loop)."""
    archive = guest_keys_archive(keys, config.sshUser, guest_nix_conf(config))
    cpio.append_archive(config.guest.initrd, archive, out)
