"""What a running Virby exposes: only loopback TCP (the port, and QEMU's forward of the guest's
sshd), no UDP, unix sockets only inside the private runtime dir, private keys 0600, and a guest
that refuses password logins and unknown keys."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import paramiko
import psutil
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testing.harness import Instance
from tests.reliability.support import report, virby_processes

pytestmark = pytest.mark.reliability


def test_only_loopback_tcp_no_udp_and_unix_sockets_in_the_private_runtime_dir(booted: Instance) -> None:
    inst = booted
    procs = virby_processes(inst)
    assert set(procs) == {"circusd", "vm", "forwarder", "idle", "qemu"}
    guest_port = inst.status()["vm"]["endpoint"][1]
    listening, udp, unix_paths = set(), [], set()
    for name, p in procs.items():
        for c in p.net_connections("inet"):
            if c.type == socket.SOCK_DGRAM:
                udp.append((name, c.laddr))
            elif c.status == psutil.CONN_LISTEN:
                listening.add((name, c.laddr.ip, c.laddr.port))
        for c in p.net_connections("unix"):
            if c.laddr:
                unix_paths.add((name, c.laddr))
    assert listening == {("circusd", "127.0.0.1", inst.port), ("forwarder", "127.0.0.1", inst.port),
                         ("qemu", "127.0.0.1", guest_port)}, listening
    assert udp == []
    run = os.path.realpath(inst.config.runtimeDir)
    outside = [(n, path) for n, path in unix_paths if not os.path.realpath(path).startswith(run + os.sep)]
    assert outside == []
    assert {os.path.basename(p) for _n, p in unix_paths} >= {"ctl.sock", "events.sock", "vm.pub.sock",
                                                             "vm.ctl.sock", "qmp.sock", "agent.sock"}
    assert os.stat(run).st_mode & 0o777 == 0o700
    # The port answers on loopback only: not on this machine's other addresses.
    others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")}
    for addr in others:
        with pytest.raises(OSError):
            socket.create_connection((addr, inst.port), timeout=2).close()
    report("exposure", {"listening": sorted(listening), "unix_sockets": len(unix_paths),
                        "other_addresses_checked": sorted(others)})


def test_private_files_are_private(booted: Instance) -> None:
    state = Path(booted.config.stateDir)
    for name in ("ssh_user_ed25519_key", "ssh_host_ed25519_key", "ssh_host_ed25519_key.dropbear"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    assert Path(booted.config.runtime("initrd.img")).stat().st_mode & 0o777 == 0o600  # carries the host key
    assert (state / "logs").stat().st_mode & 0o077 == 0
    assert state.stat().st_mode & 0o077 == 0


def _transport(port: int) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", port))
    t.start_client(timeout=60)
    return t


def test_guest_refuses_passwords_and_unknown_keys(booted: Instance) -> None:
    user = booted.config.sshUser
    t = _transport(booted.port)
    try:
        known = (Path(booted.config.stateDir) / "ssh_host_ed25519_key.pub").read_text().split()[1]
        assert t.get_remote_server_key().get_base64() == known  # the pinned host key
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password(user, user)
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("root", "root")
    finally:
        t.close()
    stranger = Ed25519PrivateKey.generate().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                                          ser.NoEncryption())
    import io

    key = paramiko.Ed25519Key.from_private_key(io.StringIO(stranger.decode()))
    t = _transport(booted.port)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_publickey(user, key)
        assert not t.is_authenticated()
    finally:
        t.close()
    # the positive control: the install's own key is accepted
    own_path = Path(booted.config.stateDir) / "ssh_user_ed25519_key"
    own = paramiko.Ed25519Key.from_private_key_file(str(own_path))
    t = _transport(booted.port)
    try:
        t.auth_publickey(user, own)
        assert t.is_authenticated()
    finally:
        t.close()
