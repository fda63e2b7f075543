"""The suspended VM on disk: one file with the whole machine state, and a record of what it
depends on (the hypervisor argv, the config, the identity of every file the guest was booted
from). Backend-neutral; the backends only write and read the state file.

Rules (issue 14):
* A snapshot is valid only while everything it depends on is unchanged and the file is whole
  (its size and sha256 match the record). Anything else: it is deleted and the VM boots cold.
* It is restored at most once: `take` removes the record and renames the file before the
  hypervisor reads it, and the file is deleted as soon as the restore has read it. Two guests
  from one memory image would share RNG state and SSH session secrets.
* Files are 0600 in a 0700 directory of their own under the state dir.

Layout: <stateDir>/snapshot/{vm.state, vm.json}; vm.state.partial while a save runs;
vm.state.restoring while a restore reads it. Both of those are leftovers after a crash and are
removed whenever the store is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from virby.core.config import Config
from virby.core.files import write_json

log = logging.getLogger("virby.snapshot")

VERSION = 1
_CHUNK = 1 << 20


class SnapshotInvalid(Exception):
    """The snapshot cannot be restored; the message says why (for the log)."""


def file_identity(path: str | None) -> dict[str, Any] | None:
    """What tells us a file is still the same one: resolved path, device, inode, size and
    mtime (ns). None for no path; {"missing": True} for a path that does not exist."""
    if not path:
        return None
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return {"path": real, "missing": True}
    return {"path": real, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def dependencies(config: Config, argv: list[str], inputs: Mapping[str, str | None]) -> dict[str, Any]:
    """Everything a snapshot depends on: the hypervisor argv, the whole config and the
    identity of each input file (kernel, initrd, disk, hypervisor binary, keys)."""
    return {
        "argv": list(argv),
        "config": json.loads(config.to_json()),
        "files": {name: file_identity(path) for name, path in sorted(inputs.items())},
    }


def default_inputs(config: Config) -> dict[str, str | None]:
    """The files every backend's guest depends on. The keys are in the guest's memory."""
    from virby.core.keys import KeyPaths

    keys = KeyPaths.in_dir(config.stateDir)
    return {
        "guest.kernel": config.guest.kernel,
        "guest.initrd": config.guest.initrd,
        "guest.disk": config.guest.disk,
        "data disk": config.state("disk.raw"),
        "hypervisor": shutil.which(config.hypervisor) or config.hypervisor,
        "host key": keys.host_key_dropbear,
        "client key": keys.client_pub,
    }


def mismatch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """Why a snapshot taken with dependencies `saved` cannot run under `now` (None: it can)."""
    if saved.get("argv") != now.get("argv"):
        return "the hypervisor command line changed"
    if saved.get("config") != now.get("config"):
        return "the config changed"
    files_then, files_now = saved.get("files") or {}, now.get("files") or {}
    for name in sorted(set(files_then) | set(files_now)):
        if files_then.get(name) != files_now.get(name):
            return f"{name} changed"
    return None


def sha256_of(path_or_fd: str | int) -> str:
    """The file's sha256 (reads with pread from an fd: no shared offset is moved)."""
    h = hashlib.sha256()
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC) if isinstance(path_or_fd, str) else path_or_fd
    try:
        offset = 0
        while chunk := os.pread(fd, _CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
    finally:
        if isinstance(path_or_fd, str):
            os.close(fd)
    return h.hexdigest()


@dataclass
class Taken:
    """A snapshot being restored: `path` is for the hypervisor to read; `verify()` (blocking:
    run it in a thread, alongside the restore, and await it inside the `with` block) raises
    SnapshotInvalid unless the bytes are the ones saved. The file is deleted when the `with`
    block ends."""

    path: str
    size: int
    sha256: str

    def verify(self) -> None:
        try:
            digest = sha256_of(self.path)
        except OSError as e:
            raise SnapshotInvalid(f"cannot read the snapshot: {e}") from e
        if digest != self.sha256:
            raise SnapshotInvalid("the snapshot is damaged (sha256 differs from the one saved)")


class SnapshotStore:
    """The one snapshot of one VM, in <stateDir>/snapshot/."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "snapshot")
        self.path = os.path.join(self.dir, "vm.state")
        self.record_path = os.path.join(self.dir, "vm.json")
        self.partial_path = self.path + ".partial"
        self.restoring_path = self.path + ".restoring"
        self._info: dict[str, Any] | None = None
        self._info_loaded = False

    # -- reading ---------------------------------------------------------------------------------

    def record(self) -> dict[str, Any] | None:
        try:
            with open(self.record_path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("version") == VERSION else None

    def info(self) -> dict[str, Any] | None:
        """size, saved_at and save_seconds of the snapshot on disk, or None (cached: the
        status broadcast asks for it often)."""
        if not self._info_loaded:
            rec = self.record()
            self._info = None
            if rec is not None and os.path.exists(self.path):
                self._info = {k: rec.get(k) for k in ("size", "saved_at", "save_seconds")}
            self._info_loaded = True
        return self._info

    def present(self) -> bool:
        return self.info() is not None

    def check(self, deps: Mapping[str, Any]) -> None:
        """Raise SnapshotInvalid unless the snapshot can be restored under `deps`."""
        rec = self.record()
        if rec is None:
            raise SnapshotInvalid("no snapshot record")
        try:
            size = os.stat(self.path).st_size
        except OSError as e:
            raise SnapshotInvalid(f"no snapshot file ({e.strerror})") from e
        if size != rec.get("size"):
            raise SnapshotInvalid(f"the snapshot is truncated or damaged ({size} bytes, "
                                  f"{rec.get('size')} saved)")
        why = mismatch(rec.get("depends") or {}, deps)
        if why:
            raise SnapshotInvalid(why)

    # -- writing ---------------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # makedirs keeps the mode of a dir that already exists

    def begin(self) -> str:
        """A new, empty 0600 file for the hypervisor to save into (any older snapshot is
        removed first: there is only ever one)."""
        self.discard()
        self._ensure_dir()
        fd = os.open(self.partial_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return self.partial_path

    def commit(self, deps: Mapping[str, Any], save_seconds: float) -> dict[str, Any]:
        """Make the saved file the snapshot: fsync it, record its size, sha256 and `deps`.
        The record is written last, so a crash before it leaves no valid snapshot. Blocking."""
        fd = os.open(self.partial_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            digest = sha256_of(fd)
        finally:
            os.close(fd)
        if size == 0:
            raise OSError("the hypervisor saved nothing (empty snapshot file)")
        os.replace(self.partial_path, self.path)
        rec = {"version": VERSION, "size": size, "sha256": digest, "saved_at": time.time(),
               "save_seconds": round(save_seconds, 3), "depends": dict(deps)}
        write_json(self.record_path, rec, mode=0o600)
        self._info_loaded = False
        return rec

    @contextlib.contextmanager
    def take(self, deps: Mapping[str, Any]) -> Iterator[Taken]:
        """Check the snapshot, then make it unrestorable before anything reads it (the
        record goes, the file is renamed); yield it for the restore; delete it afterwards.
        An invalid snapshot is deleted and SnapshotInvalid raised."""
        try:
            self.check(deps)
            rec = self.record() or {}
            os.replace(self.path, self.restoring_path)
        except (SnapshotInvalid, OSError) as e:
            self.discard()
            raise e if isinstance(e, SnapshotInvalid) else SnapshotInvalid(str(e)) from e
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)
        self._info_loaded = False
        try:
            yield Taken(self.restoring_path, int(rec.get("size") or 0), str(rec.get("sha256")))
        finally:
            self.discard()

    def discard(self) -> bool:
        """Delete the snapshot and any leftover; True if a snapshot (record) was there."""
        had = os.path.exists(self.record_path)
        for path in (self.record_path, self.path, self.partial_path, self.restoring_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._info_loaded = False
        return had

    def unfinished_save(self) -> bool:
        """A save file a killed worker left without its record (the save may be complete)."""
        try:
            return os.path.getsize(self.partial_path) > 0 and self.record() is None
        except OSError:
            return False

    def clean_leftovers(self) -> None:
        """At start-up: a save or restore that a crash interrupted leaves files that can never
        be restored; a record without its file (or the reverse) is no snapshot either."""
        for path in (self.partial_path, self.restoring_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if (self.record() is None) != (not os.path.exists(self.path)):
            self.discard()
        self._info_loaded = False
