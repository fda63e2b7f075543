"""`virby run`: prepare the directories and keys, refuse to start over another arbiter or a
taken port, render the circus ini and exec circusd in the foreground (what launchd runs).

circusd itself exits with status 0 when it cannot bind its socket (circus 0.19 logs the error
and returns), so every reason not to start is found here first and reported as one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys

from virby.core.config import Config
from virby.core.protocol import STALE_RUNTIME_FILES
from virby.supervisor import circus_ini


class CannotStart(Exception):
    """Why the arbiter cannot start, worded for the user."""


def _port_holder(port: int) -> str:
    import psutil

    try:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_port_free(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as circus binds it
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CannotStart(f"port 127.0.0.1:{port} is already in use{_port_holder(port)}; "
                              "stop that program or set `port` in the config") from e
        raise CannotStart(f"cannot bind 127.0.0.1:{port}: {e.strerror}") from e
    finally:
        s.close()


def prepare_dirs(config: Config) -> None:
    from virby.core.keys import ensure_keys

    try:
        os.makedirs(config.runtimeDir, mode=0o700, exist_ok=True)
        os.chmod(config.runtimeDir, 0o700)  # sockets without auth: only we may reach them
        # Made before its logs/ child: makedirs gives intermediate dirs the default mode (0755).
        os.makedirs(config.stateDir, mode=0o700, exist_ok=True)
        os.makedirs(config.log_dir, mode=0o700, exist_ok=True)
        ensure_keys(config.stateDir)
    except OSError as e:
        raise CannotStart(f"cannot prepare {e.filename or config.stateDir}: {e.strerror}") from e


def clean_runtime_dir(config: Config) -> None:
    for name in STALE_RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.runtime(name))


ARBITER_LOCK = "arbiter.lock"


def hold_arbiter_lock(config: Config) -> int:
    """An exclusive lock on `<runtimeDir>/arbiter.lock`, held by this process and, through
    exec, by circusd until it exits: of two `virby run` started at the same instant, exactly
    one gets it (the other used to reach circusd and fail with its "pid file is stale")."""
    import fcntl

    path = config.runtime(ARBITER_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise CannotStart(f"cannot open {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CannotStart(f"virby is already running for this config ({config.runtimeDir})") from None
        raise CannotStart(f"cannot lock {path}: {e.strerror}") from e
    os.set_inheritable(fd, True)  # kept across exec: the lock lives as long as circusd
    return fd


def exec_circusd(config: Config) -> None:
    """Never returns on success: this process becomes circusd."""
    from virby.supervisor.control import NotRunning, circus_call

    prepare_dirs(config)
    hold_arbiter_lock(config)
    try:
        circus_call(config, "status", timeout=0.5)
    except NotRunning:
        pass
    else:
        raise CannotStart(f"virby is already running for this config ({config.runtimeDir})")
    check_port_free(config.port)
    clean_runtime_dir(config)
    try:
        ini = circus_ini.write_all(config)
    except OSError as e:
        # A full disk fails in write() or close(), which name no file: name the directory.
        raise CannotStart(f"cannot write {e.filename or config.runtimeDir}: {e.strerror}") from e
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "circus.circusd", ini])
