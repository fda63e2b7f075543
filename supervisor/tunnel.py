"""`virby forward`: reach a TCP service inside the builder from the host, through SSH.

The SSH connection goes to the forwarder's loopback port like any client's, so it wakes the VM
and, while it is open, counts as activity: the idle monitor does not pause the VM under it.
Both ends are loopback only: the local listener binds 127.0.0.1, and the guest side connects
to 127.0.0.1:GUEST_PORT inside the guest. The guest's host key is checked against the pinned
one (paramiko rejects any other key before the tunnel is up).

Resource handling: `Tunnel` owns the sshtunnel forwarder (its SSH transport and listener) and
closes it in `close()`; `serve()` closes it on SIGINT/SIGTERM and returns normally.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from virby.core.config import Config


class TunnelError(Exception):
    """The tunnel could not be opened; the text says why."""


class Tunnel:
    def __init__(self, config: Config, guest_port: int, host_port: int = 0) -> None:
        self.config = config
        self.guest_port = guest_port
        self.host_port = host_port
        self._server: Any = None

    def open(self, timeout: float = 30.0) -> tuple[str, int]:
        """Connect and start listening; return the local (host, port)."""
        import paramiko
        import sshtunnel

        from virby.core.keys import KeyPaths
        from virby.core.sshcheck import pinned_host_key

        keys = KeyPaths.in_dir(self.config.stateDir)
        try:
            host_key = pinned_host_key(keys)
            client_key = paramiko.Ed25519Key.from_private_key_file(keys.client_key)
        except (OSError, ValueError, paramiko.SSHException) as e:
            raise TunnelError(f"cannot read the keys in {self.config.stateDir}: {e}") from e
        # sshtunnel logs its own errors to stderr in a format of its own; ours are enough.
        quiet = logging.getLogger("virby.tunnel")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        server = sshtunnel.SSHTunnelForwarder(
            ("127.0.0.1", self.config.port),
            ssh_username=self.config.sshUser,
            ssh_pkey=client_key,
            ssh_host_key=host_key,
            allow_agent=False,
            host_pkey_directories=[],
            ssh_config_file=None,
            remote_bind_address=("127.0.0.1", self.guest_port),
            local_bind_address=("127.0.0.1", self.host_port),
            set_keepalive=10.0,
            logger=quiet,
        )
        sshtunnel.SSH_TIMEOUT = timeout
        sshtunnel.TUNNEL_TIMEOUT = timeout
        try:
            server.start()
        except sshtunnel.BaseSSHTunnelForwarderError as e:
            server.stop(force=True)
            reason = str(e.value if hasattr(e, "value") else e)
            if "Could not establish session" in reason:
                reason += (" (a wrong host key shows up here too: run `virby doctor`)")
            raise TunnelError(reason) from e
        except OSError as e:
            server.stop(force=True)
            raise TunnelError(f"cannot listen on 127.0.0.1:{self.host_port}: {e.strerror or e}") from e
        self._server = server
        host, port = server.local_bind_address
        return str(host), int(port)

    def alive(self) -> bool:
        server = self._server
        if server is None:
            return False
        transport = getattr(server, "_transport", None)
        return bool(transport is not None and transport.is_active())

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(force=True)
            self._server = None

    def serve(self) -> str:
        """Block until SIGINT/SIGTERM (returns "signal") or the SSH connection drops
        (returns "dropped"); the tunnel is closed either way."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(0.5):
                if not self.alive():
                    return "dropped"
            return "signal"
        finally:
            self.close()
            for s, handler in old.items():
                signal.signal(s, handler)
