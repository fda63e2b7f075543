"""Per-install keys: created once, never replaced, right modes, usable by dropbear and ssh."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import paramiko

from virby.core.keys import HOST_KEY_ALIAS, ensure_keys


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_are_created_private_and_stable(tmp_path: Path) -> None:
    keys = ensure_keys(str(tmp_path / "state"))
    assert mode(str(tmp_path / "state")) == 0o700
    for private in (keys.client_key, keys.host_key, keys.host_key_dropbear):
        assert mode(private) == 0o600
    before = {p: Path(p).read_bytes() for p in (keys.client_key, keys.host_key, keys.known_hosts)}
    again = ensure_keys(str(tmp_path / "state"))
    assert {p: Path(p).read_bytes() for p in before} == before
    assert again == keys


def test_known_hosts_pins_the_host_key_under_the_alias(tmp_path: Path) -> None:
    keys = ensure_keys(str(tmp_path))
    line = Path(keys.known_hosts).read_text().split()
    pub = Path(keys.host_pub).read_text().split()
    assert line[0] == HOST_KEY_ALIAS and line[1:3] == pub[:2]
    loaded = paramiko.Ed25519Key.from_private_key_file(keys.host_key)
    assert loaded.get_base64() == pub[1]


def test_missing_public_files_are_rebuilt_from_the_private_keys(tmp_path: Path) -> None:
    keys = ensure_keys(str(tmp_path))
    pub = Path(keys.host_pub).read_text()
    os.unlink(keys.host_pub)
    os.unlink(keys.known_hosts)
    ensure_keys(str(tmp_path))
    assert Path(keys.host_pub).read_text() == pub
