"""`virby status`'s store line: the guest's df when it answers, the disk file otherwise."""

from __future__ import annotations

from pathlib import Path

from virby.core.config import from_dict
from virby.supervisor.statusview import store_line
from virby.supervisor.storeuse import parse_df, store_use

DF = """Filesystem           1024-blocks    Used Available Capacity Mounted on
/dev/vda                 1992552   1756944    219224  89% /nix
"""


def test_df_is_read_in_bytes() -> None:
    assert parse_df(DF) == {"size": 1992552 * 1024, "used": 1756944 * 1024, "avail": 219224 * 1024}
    assert parse_df("df: /nix: not found\n") is None
    assert parse_df("") is None


def test_a_stopped_vm_shows_the_disk_file_without_asking_the_guest(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "diskSize": "2GiB"})
    (tmp_path / "disk.raw").write_bytes(b"x" * 8192)
    use = store_use(c, {"state": "stopped", "endpoint": ["127.0.0.1", 1]})
    assert use["guest"] is None and use["disk_size"] == 2 << 30 and use["allocated"] >= 8192
    assert "error" not in use
    assert store_line(use).startswith("disk 2.0 GiB, ")
    assert "shows while the VM runs" in store_line(use)


def test_the_guest_s_view_is_shown_when_there() -> None:
    line = store_line({"disk_size": 2 << 30, "allocated": 1, "guest": parse_df(DF)})
    assert line.startswith("1.7 GiB used of 1.9 GiB (88%), 214.1 MiB free")
