"""Prove the guest's sshd is ready: one real SSH handshake (paramiko) against the pinned host
key. A port probe proves nothing here: QEMU's user networking accepts TCP before
the guest exists (slirp answers for it)."""

from __future__ import annotations

import base64
import socket
from typing import TYPE_CHECKING

from virby.core.keys import KeyPaths

if TYPE_CHECKING:
    import paramiko


class SSHNotReady(Exception):
    """The handshake failed; the text says at which step."""


def pinned_host_key(keys: KeyPaths) -> paramiko.PKey:
    import paramiko  # ~10 MiB of RSS: loaded at the first boot, not by an idle vm worker

    with open(keys.host_pub) as f:
        kind, data = f.read().split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


def prove_ssh(host: str, port: int, keys: KeyPaths, timeout: float) -> None:
    """One SSH handshake (key exchange) and a check of the host key the guest proves it holds
    against the pinned one. Blocking: run it in a thread. Raises SSHNotReady.

    No login: the clients log in themselves a moment later, and a refused key reaches them as
    "Permission denied (publickey)". The login would add ~70 ms (TCG) to every cold start."""
    import paramiko

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise SSHNotReady(f"connect to {host}:{port}: {e}") from e
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHNotReady(f"handshake: {e or type(e).__name__}") from e
        server_key = transport.get_remote_server_key()
        if server_key != pinned_host_key(keys):
            raise SSHNotReady(
                f"host key mismatch: the guest offered {server_key.get_name()} "
                f"{server_key.get_fingerprint().hex()}, not the pinned key in {keys.host_pub}")
    finally:
        transport.close()
