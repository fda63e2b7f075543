"""Per-install SSH keys in the state dir: the client key, the guest's host key, known_hosts.

Generated once (never on an option change) and handed to the guest at boot, so no image ever
holds a private key. Files are written 0600 through a temp file and rename, so a crash or a full
disk never leaves half a key behind.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from virby.core import cpio
from virby.core.files import write_atomic, write_if_changed

HOST_KEY_ALIAS = "virby-vm-key"


@dataclass(frozen=True)
class KeyPaths:
    client_key: str  # OpenSSH private key the host uses to log in
    client_pub: str
    host_key: str  # the guest's host key, OpenSSH format (vfkit guest, sshd)
    host_key_dropbear: str  # the same key in dropbear's format (the Linux test guest)
    host_pub: str
    known_hosts: str  # "virby-vm-key ssh-ed25519 ..." pinned under HostKeyAlias

    @classmethod
    def in_dir(cls, state_dir: str) -> KeyPaths:
        j = os.path.join
        return cls(
            client_key=j(state_dir, "ssh_user_ed25519_key"),
            client_pub=j(state_dir, "ssh_user_ed25519_key.pub"),
            host_key=j(state_dir, "ssh_host_ed25519_key"),
            host_key_dropbear=j(state_dir, "ssh_host_ed25519_key.dropbear"),
            host_pub=j(state_dir, "ssh_host_ed25519_key.pub"),
            known_hosts=j(state_dir, "ssh_known_hosts"),
        )


def _load_or_create(path: str, comment: str) -> Ed25519PrivateKey:
    if os.path.exists(path):
        with open(path, "rb") as f:
            key = ser.load_ssh_private_key(f.read(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    write_atomic(path, pem, 0o600)
    return key


def public_line(key: Ed25519PrivateKey, comment: str) -> str:
    pub = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    return f"{pub.decode()} {comment}"


def dropbear_private(key: Ed25519PrivateKey) -> bytes:
    """Dropbear's key file: string "ssh-ed25519", then string(seed || public key)."""
    seed = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)

    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    return string(b"ssh-ed25519") + string(seed + pub)


def ensure_keys(state_dir: str) -> KeyPaths:
    """Create whatever is missing; never replace an existing key. Idempotent."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    paths = KeyPaths.in_dir(state_dir)
    client = _load_or_create(paths.client_key, "virby-client")
    host = _load_or_create(paths.host_key, "root@virby-vm")
    client_line = public_line(client, "virby-client") + "\n"
    host_line = public_line(host, "root@virby-vm") + "\n"
    wanted = {
        paths.client_pub: (client_line.encode(), 0o644),
        paths.host_pub: (host_line.encode(), 0o644),
        paths.host_key_dropbear: (dropbear_private(host), 0o600),
        paths.known_hosts: (f"{HOST_KEY_ALIAS} {host_line}".encode(), 0o644),
    }
    for path, (data, mode) in wanted.items():
        write_if_changed(path, data, mode)
    return paths


def guest_keys_archive(keys: KeyPaths, user: str, nix_conf: str = "") -> bytes:
    """The newc cpio appended to the guest's initrd at boot (image/README.md, "Keys at boot"):
    the host key in dropbear's format, the client's public key, the login user and the host's
    part of the guest Nix's settings (workers/guestconf.py; the nix guest includes it)."""
    with open(keys.host_key_dropbear, "rb") as f:
        host_key = f.read()
    with open(keys.client_pub, "rb") as f:
        client_pub = f.read()
    return cpio.newc_archive([
        cpio.CpioEntry("etc", mode=0o755, directory=True),
        cpio.CpioEntry("etc/virby", mode=0o700, directory=True),
        cpio.CpioEntry("etc/virby/ssh_host_ed25519_key", data=host_key, mode=0o600),
        cpio.CpioEntry("etc/virby/authorized_keys", data=client_pub, mode=0o644),
        cpio.CpioEntry("etc/virby/user", data=user.encode() + b"\n", mode=0o644),
        cpio.CpioEntry("etc/virby/nix.conf", data=nix_conf.encode(), mode=0o644),
    ])
