"""core/cpio.py on its own: the same entries give the same bytes, bad entries are refused,
and appending to an initrd (tests/integration/test_cpio_gnu.py reads the archives with GNU cpio)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from virby.core.cpio import CpioEntry, append_archive, newc_archive

KEYS = [
    CpioEntry("etc", mode=0o755, directory=True),
    CpioEntry("etc/virby", mode=0o700, directory=True),
    CpioEntry("etc/virby/ssh_host_ed25519_key", data=b"\0\0\0\x0bssh-ed25519" + bytes(36),
              mode=0o600),
    CpioEntry("etc/virby/authorized_keys", data=b"ssh-ed25519 AAAAC3Nz test\n", mode=0o644),
    CpioEntry("etc/virby/user", data=b"builder\n", mode=0o644),
]


def test_same_entries_same_bytes() -> None:
    assert newc_archive(KEYS) == newc_archive(list(KEYS))


@pytest.mark.parametrize(("entries", "match"), [
    ([CpioEntry("a", data=b"1"), CpioEntry("/a", data=b"2")], "duplicate"),
    ([CpioEntry("a", data=b"1"), CpioEntry("a/b", data=b"2")], "is a file"),
])
def test_inconsistent_entries_are_refused(entries: list[CpioEntry], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        newc_archive(entries)


@pytest.mark.parametrize("kwargs", [
    {"path": "d", "data": b"x", "directory": True},
    {"path": "f", "mode": 0o100644},
    {"path": "../etc/passwd"},
    {"path": "/"},
    {"path": ""},
])
def test_bad_entries_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CpioEntry(**kwargs)


def test_append_replaces_an_existing_output(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_bytes(b"1234")
    out = tmp_path / "out"
    out.write_bytes(b"old contents, longer than the new ones")
    append_archive(str(base), b"extra", str(out))
    assert out.read_bytes() == b"1234extra"


def test_append_failure_leaves_no_temp_file_and_no_output(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    with pytest.raises(FileNotFoundError):
        append_archive(str(tmp_path / "missing"), b"extra", str(out_dir / "boot.img"))
    assert os.listdir(out_dir) == []
