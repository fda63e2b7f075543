"""core/cpio.py, checked against the real GNU cpio: what it lists and what it extracts
(the checks that need no cpio process are in tests/unit/test_cpio.py)."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_cpio import KEYS  # the keys archive the unit tier checks byte by byte
from virby.core.cpio import CpioEntry, append_archive, newc_archive

pytestmark = pytest.mark.integration


def cpio_list(archive: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


def cpio_list_long(archive: bytes) -> dict[str, list[str]]:
    """name -> the `ls -l` style fields GNU cpio prints (mode, links, uid, gid, size, ...)."""
    out = subprocess.run(["cpio", "-tv", "--numeric-uid-gid", "--quiet"], input=archive,
                         capture_output=True, check=True)
    rows = {}
    for line in out.stdout.decode().splitlines():
        fields = line.split()
        rows[fields[-1]] = fields
    return rows


def cpio_extract(archive: bytes, into: Path) -> None:
    into.mkdir()
    subprocess.run(["cpio", "-i", "--quiet", "--no-absolute-filenames", "--no-preserve-owner",
                    "--make-directories"], input=archive, cwd=into, check=True)




def test_the_keys_archive_extracts_with_contents_and_modes(tmp_path: Path) -> None:
    archive = newc_archive(KEYS)
    assert cpio_list(archive) == [_name(e) for e in KEYS]
    root = tmp_path / "x"
    cpio_extract(archive, root)
    for e in KEYS:
        st_ = (root / e.path).lstat()
        assert stat.S_IMODE(st_.st_mode) == e.mode, e.path
        if e.directory:
            assert stat.S_ISDIR(st_.st_mode)
        else:
            assert stat.S_ISREG(st_.st_mode)
            assert (root / e.path).read_bytes() == e.data


def _name(e: CpioEntry) -> str:
    return e.path.strip("/")


def test_owner_type_and_size_are_in_the_headers() -> None:
    archive = newc_archive([
        CpioEntry("home/builder", mode=0o755, uid=1000, gid=1000, directory=True),
        CpioEntry("home/builder/f", data=b"12345", mode=0o640, uid=1000, gid=100),
    ])
    rows = cpio_list_long(archive)
    assert rows["home"][:4] == ["drwxr-xr-x", "2", "0", "0"]
    assert rows["home/builder"][:4] == ["drwxr-xr-x", "2", "1000", "1000"]
    assert rows["home/builder/f"][:5] == ["-rw-r-----", "1", "1000", "100", "5"]


def test_missing_parents_are_added_before_their_children() -> None:
    archive = newc_archive([CpioEntry("a/b/c/file", data=b"x"), CpioEntry("a/other", data=b"y")])
    assert cpio_list(archive) == ["a", "a/b", "a/b/c", "a/b/c/file", "a/other"]
    rows = cpio_list_long(archive)
    assert rows["a/b"][0] == "drwxr-xr-x"


def test_a_listed_parent_given_after_its_child_moves_up_and_keeps_its_mode(tmp_path: Path) -> None:
    archive = newc_archive([
        CpioEntry("etc/virby/user", data=b"builder\n"),
        CpioEntry("etc/virby", mode=0o700, directory=True),
    ])
    assert cpio_list(archive) == ["etc", "etc/virby", "etc/virby/user"]
    root = tmp_path / "x"
    cpio_extract(archive, root)
    assert stat.S_IMODE((root / "etc/virby").stat().st_mode) == 0o700


def test_leading_slash_and_dot_are_dropped() -> None:
    archive = newc_archive([CpioEntry("/etc/./hostname", data=b"virby-vm\n")])
    assert cpio_list(archive) == ["etc", "etc/hostname"]


def test_archive_ends_with_trailer_and_is_4_byte_aligned() -> None:
    archive = newc_archive([CpioEntry("f", data=b"abc")])
    assert len(archive) % 4 == 0
    trailer = archive.rindex(b"070701")
    assert archive[trailer + 110:].rstrip(b"\0") == b"TRAILER!!!"
    assert newc_archive([]).startswith(b"070701")
    assert cpio_list(newc_archive([])) == []


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", range(8))
def test_padding_for_every_name_and_data_length_mod_4(
        tmp_path: Path, name_len: int, data_len: int) -> None:
    # two members: a wrong pad after the first would corrupt the second
    first = CpioEntry("n" * name_len, data=bytes(range(data_len)), mode=0o600)
    second = CpioEntry("z" * (9 - name_len), data=b"after", mode=0o644)
    root = tmp_path / "x"
    cpio_extract(newc_archive([first, second]), root)
    assert (root / first.path).read_bytes() == first.data
    assert (root / second.path).read_bytes() == b"after"


_segment = st.text(alphabet="abcxyz_-.0", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.lists(_segment, min_size=1, max_size=4).map("/".join),
                       st.binary(max_size=300), max_size=8))
def test_any_file_set_round_trips_through_real_cpio(files: dict[str, bytes]) -> None:
    # drop paths that are a parent of another path (a file cannot also be a directory)
    files = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)}
    archive = newc_archive([CpioEntry(p, data=d) for p, d in files.items()])
    names = cpio_list(archive)
    assert set(files) <= set(names)
    for i, name in enumerate(names):  # every parent before its child
        parent = name.rpartition("/")[0]
        assert not parent or parent in names[:i]
    with tempfile.TemporaryDirectory() as tmp:  # hypothesis reruns the body: no tmp_path
        root = Path(tmp) / "x"
        cpio_extract(archive, root)
        for name, d in files.items():
            assert (root / name).read_bytes() == d


def test_append_pads_the_base_to_4_bytes_then_appends(tmp_path: Path) -> None:
    base = tmp_path / "initrd.img"
    base.write_bytes(gzip.compress(newc_archive([CpioEntry("init", data=b"#!/bin/sh\n")]),
                                   mtime=0) + b"x")  # any length; force one that is not % 4
    base_bytes = base.read_bytes()
    pad = (4 - len(base_bytes) % 4) % 4
    extra = newc_archive(KEYS)
    out = tmp_path / "run" / "boot.img"
    out.parent.mkdir()
    append_archive(str(base), extra, str(out))
    combined = out.read_bytes()
    assert combined == base_bytes + b"\0" * pad + extra
    assert (len(base_bytes) + pad) % 4 == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(out.parent) == ["boot.img"]  # no temp file left behind
    # the appended part is a whole archive on its own
    assert cpio_list(combined[len(base_bytes) + pad:]) == [_name(e) for e in KEYS]
