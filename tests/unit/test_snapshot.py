"""The snapshot record and its validity rules (workers/snapshot.py): files only, no processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from virby.core.config import Config, from_dict
from virby.supervisor.statusview import format_status
from virby.workers.snapshot import SnapshotInvalid, SnapshotStore, dependencies, file_identity


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    for f in (kernel, initrd):
        if not f.exists():
            f.write_bytes(b"x" * 100)
    data: dict[str, Any] = {"stateDir": str(tmp_path / "state"), "runtimeDir": str(tmp_path / "run"),
                            "guest": {"kernel": str(kernel), "initrd": str(initrd)}, **overrides}
    return from_dict(data, source=None)


def deps_for(config: Config, argv: list[str] | None = None) -> dict[str, Any]:
    return dependencies(config, argv or ["qemu", "-m", "512"],
                        {"guest.kernel": config.guest.kernel, "guest.initrd": config.guest.initrd,
                         "guest.disk": config.guest.disk})


def saved(config: Config, data: bytes = b"machine state " * 1000) -> SnapshotStore:
    """A store with a committed snapshot of `data` taken under `config`."""
    store = SnapshotStore(config.stateDir)
    path = store.begin()
    Path(path).write_bytes(data)
    store.commit(deps_for(config), save_seconds=0.25)
    return store


def test_a_saved_snapshot_is_valid_under_the_same_dependencies(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    store.check(deps_for(config))
    info = store.info()
    assert info is not None and info["size"] == 14000 and info["save_seconds"] == 0.25


def test_snapshot_files_are_0600_in_a_0700_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    os.makedirs(config.stateDir, mode=0o755)
    store = saved(config)
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    for path in (store.path, store.record_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def _other_argv(cfg: Config, tmp: Path) -> tuple[Config, list[str] | None]:
    return cfg, ["qemu", "-m", "1024"]


def _other_config(cfg: Config, tmp: Path) -> tuple[Config, list[str] | None]:
    return make_config(tmp, cores=3), None


def _new_kernel(cfg: Config, tmp: Path) -> tuple[Config, list[str] | None]:
    Path(cfg.guest.kernel).write_bytes(b"y" * 101)
    return cfg, None


def _touched_initrd(cfg: Config, tmp: Path) -> tuple[Config, list[str] | None]:
    os.utime(cfg.guest.initrd, ns=(1, 1))
    return cfg, None


@pytest.mark.parametrize(("change", "reason"), [
    (_other_argv, "the hypervisor command line changed"),
    (_other_config, "the config changed"),
    (_new_kernel, "guest.kernel changed"),
    (_touched_initrd, "guest.initrd changed"),
])
def test_any_change_in_what_it_depends_on_invalidates_it(tmp_path: Path, change: Any, reason: str) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    new_config, argv = change(config, tmp_path)
    with pytest.raises(SnapshotInvalid, match=reason), store.take(deps_for(new_config, argv)):
        pass
    assert not store.present()
    assert os.listdir(store.dir) == []  # an invalid snapshot is deleted


def test_a_truncated_snapshot_is_invalid(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    with open(store.path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SnapshotInvalid, match="truncated"):
        store.check(deps_for(config))


def test_a_damaged_snapshot_fails_verification(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    with open(store.path, "r+b") as f:
        f.seek(5000)
        f.write(b"X")
    with pytest.raises(SnapshotInvalid, match="damaged"), store.take(deps_for(config)) as taken:
        taken.verify()
    assert os.listdir(store.dir) == []


def test_take_makes_it_unrestorable_before_the_restore_reads_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    with store.take(deps_for(config)) as taken:
        taken.verify()
        assert Path(taken.path).read_bytes().startswith(b"machine state")
        assert not store.present()
        assert not os.path.exists(store.record_path)
        with pytest.raises(SnapshotInvalid, match="no snapshot record"), store.take(deps_for(config)):
            pass
    assert os.listdir(store.dir) == []  # and nothing is left once the restore has read it


def test_a_new_save_replaces_the_old_snapshot(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config, b"old" * 10)
    path = store.begin()
    assert not store.present() and os.path.getsize(path) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_empty_save_is_no_snapshot(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = SnapshotStore(config.stateDir)
    store.begin()
    with pytest.raises(OSError, match="empty"):
        store.commit(deps_for(config), 0.1)
    assert not store.present()


def test_leftovers_of_an_interrupted_save_or_restore_are_removed(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = saved(config)
    Path(store.partial_path).write_bytes(b"half")
    Path(store.restoring_path).write_bytes(b"half")
    store.clean_leftovers()
    assert sorted(os.listdir(store.dir)) == ["vm.json", "vm.state"]
    os.unlink(store.path)  # a record without its file is no snapshot
    store.clean_leftovers()
    assert os.listdir(store.dir) == [] and not store.present()


def test_file_identity_follows_symlinks_and_tells_missing_files(tmp_path: Path) -> None:
    target = tmp_path / "k"
    target.write_bytes(b"1")
    (tmp_path / "link").symlink_to(target)
    assert file_identity(str(tmp_path / "link")) == file_identity(str(target))
    assert file_identity(str(tmp_path / "nope")) == {"path": str(tmp_path / "nope"), "missing": True}
    assert file_identity(None) is None


def test_status_shows_the_saved_vm_and_both_counters() -> None:
    now = 1_000_000.0
    vm = {"state": "suspended", "since": now - 30, "backend": "qemu", "boots": 1, "restores": 2,
          "last_boot_seconds": 6.5, "last_restore_seconds": 1.04,
          "snapshot": {"size": 106 << 20, "saved_at": now - 30, "save_seconds": 0.31}}
    text = format_status({"vm": vm, "time": now})
    assert "boots 1" in text and "restores 2" in text and "last restore 1.0s" in text
    assert "saved VM    106.0 MiB, saved 30s ago (in 0.31s)" in text
