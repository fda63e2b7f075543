"""The file system and the port working against us: full disks (small tmpfs mounts), what a
crash leaves in the runtime dir, the port taken by another program, unusable paths. Each gives
one clear error, and nothing is corrupted: keys and config stay byte-for-byte the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from testing.harness import Instance
from tests.reliability.conftest import boot
from tests.reliability.support import (
    fill,
    mount_tmpfs,
    probe_banner,
    stop_arbiter,
    tree_snapshot,
    umount,
    wait_until,
)
from tests.require import unavailable

pytestmark = pytest.mark.reliability


def run_once(inst: Instance, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`virby run` expected to refuse to start: returns its result."""
    return subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "run", "--config",
                           str(inst.config_path)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out.stdout
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr  # one clear line, no traceback
    return lines[0]


@pytest.fixture
def tmpfs(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A small tmpfs; big enough for a boot's initrd copy when the test uses the guest."""
    size = 1 << 20
    if "guest_dir" in request.fixturenames:
        size += 2 * os.path.getsize(request.getfixturevalue("guest_dir") / "initrd.img")
    mnt = Path(f"/tmp/vbfs{os.getpid()}")
    if not mount_tmpfs(mnt, f"{size // 1024}k"):
        unavailable("cannot mount a tmpfs here (needs root): disk-full cases not exercised")
    try:
        yield mnt
    finally:
        umount(mnt)
        mnt.rmdir()


def test_state_dir_full_before_the_first_run(tmpfs: Path) -> None:
    fill(tmpfs)
    with Instance(guest_dir=None, stateDir=str(tmpfs / "state")) as inst:
        config_before = inst.config_path.read_bytes()
        line = one_line_error(run_once(inst))
        assert "No space left on device" in line and str(tmpfs) in line, line
        assert inst.config_path.read_bytes() == config_before
        leftovers = [p.name for p in (tmpfs / "state").glob("*") if ".tmp" in p.name]
        assert leftovers == []  # no half-written key


def test_state_dir_full_with_keys_still_serves_and_keeps_the_keys(tmpfs: Path, guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir, stateDir=str(tmpfs / "state")) as inst:
        boot(inst)
        inst.cli("stop", "--cold", timeout=60)
        inst.wait_vm("stopped")
        keys = {k: v for k, v in tree_snapshot(tmpfs / "state").items() if not k.startswith("logs/")}
        fill(tmpfs)
        # A boot with the state dir full: logs cannot grow, but keys are only read.
        outcome, _s, detail = probe_banner(inst.port, timeout=90)
        assert outcome == "ok", detail
        assert inst.ssh("true").returncode == 0
        # and a restart of the whole arbiter on the full disk
        stop_arbiter(inst)
        boot(inst)
        assert inst.ssh("true").returncode == 0
        after = {k: v for k, v in tree_snapshot(tmpfs / "state").items() if not k.startswith("logs/")}
        after.pop("filler", None), after.pop("filler2", None)
        keys.pop("filler", None), keys.pop("filler2", None)
        assert after == keys


def test_runtime_dir_full_before_the_run(tmpfs: Path) -> None:
    fill(tmpfs)
    with Instance(guest_dir=None, runtimeDir=str(tmpfs / "run")) as inst:
        line = one_line_error(run_once(inst))
        assert "No space left on device" in line and str(tmpfs) in line, line
        assert tree_snapshot(inst.dir / "state")  # keys were made ...
        for p in (inst.dir / "state").glob("ssh_*key"):
            assert p.stat().st_mode & 0o777 == 0o600


def test_runtime_dir_full_at_boot_fails_with_the_reason_then_recovers(tmpfs: Path, guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir, runtimeDir=str(tmpfs / "run")) as inst:
        inst.start()
        fill(tmpfs)
        outcome, _s, _d = probe_banner(inst.port, timeout=60)
        assert outcome == "cut"  # the forwarder closes the client rather than hang it
        vm = inst.wait_vm("failed", timeout=30)
        assert "No space left on device" in vm["reason"], vm["reason"]
        assert [p.name for p in (tmpfs / "run").glob(".initrd*")] == []  # no half-written initrd
        # circusd copies the worker's stderr into the log file: wait for the line to land
        log = inst.dir / "state" / "logs" / "forwarder.log"
        wait_until(lambda: "No space left on device" in log.read_text(), 10, "the reason in forwarder.log")
        (tmpfs / "filler").unlink()
        (tmpfs / "filler2").unlink()
        # after the boot backoff (2 s for the first failure) the next client boots the VM
        wait_until(lambda: time.time() >= (vm.get("retry_at") or 0), 10, "the boot backoff")
        outcome, _s, detail = probe_banner(inst.port, timeout=90)
        assert outcome == "ok", (detail, inst.status()["vm"])
        assert inst.status()["vm"]["state"] == "running"


def test_stale_files_from_a_crash_do_not_mislead_the_next_run(guest_dir: Path) -> None:
    """What a kill -9 of everything leaves: a pid file for circusd, socket files nobody listens
    on, failure records, and a QEMU pid file whose pid is now another, live program. That
    program must not be touched; the new arbiter starts and boots a fresh VM."""
    with Instance(guest_dir=guest_dir) as inst:
        run = inst.dir / "run"
        run.mkdir(mode=0o700)
        bystander = subprocess.Popen(["sleep", "300"])
        try:
            (run / "circusd.pid").write_text("999999")
            for name in ("ctl.sock", "events.sock", "vm.pub.sock", "vm.ctl.sock", "qmp.sock", "agent.sock"):
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(run / name))
                s.close()  # the file stays, nobody listens
            old = {"count": 9, "reason": "old", "time": 0, "backoff": 60}
            (run / "vm.failure").write_text(json.dumps(old))
            (run / "vm.counters.json").write_text("{not json")
            (run / "qemu.pid.json").write_text(json.dumps({
                "pid": bystander.pid, "create_time": psutil.Process(bystander.pid).create_time(),
                "argv": ["qemu-system-x86_64", "-name", "virby-vm"]}))
            boot(inst)
            assert bystander.poll() is None, "the vm worker killed a program that is not its QEMU"
            st = inst.status()
            assert st["vm"]["boots"] == 1
            assert "failure" not in st["watchers"]["vm"]
            assert inst.qemu() is not None and inst.qemu().pid != bystander.pid  # type: ignore[union-attr]
            assert inst.ssh("true").returncode == 0
        finally:
            bystander.kill()
            bystander.wait()


def test_port_taken_by_another_program_on_any_address() -> None:
    """A program on 0.0.0.0:port also makes 127.0.0.1:port unusable: one line naming it."""
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with Instance(guest_dir=None, port=port) as inst:
            line = one_line_error(run_once(inst))
            assert f"127.0.0.1:{port} is already in use" in line and f"pid {os.getpid()}" in line
            assert not (inst.dir / "run" / "circus.ini").exists()


def test_a_second_run_for_the_same_config_leaves_the_first_alone(instance: Instance) -> None:
    before = {p.name for p in (instance.dir / "run").iterdir()}
    keys = tree_snapshot(instance.dir / "state")
    line = one_line_error(run_once(instance))
    assert "already running" in line
    assert {p.name for p in (instance.dir / "run").iterdir()} >= before - {"vm.counters.json"}
    assert instance.circus("status")["statuses"]["forwarder"] == "active"
    assert {k: v for k, v in tree_snapshot(instance.dir / "state").items() if not k.startswith("logs/")} == \
        {k: v for k, v in keys.items() if not k.startswith("logs/")}


# -- paths and permissions (the value side of the config is tests/unit/test_config.py) ------------


@pytest.mark.parametrize(("key", "make", "expect"), [
    ("stateDir", lambda d: d / "afile" / "state", "Not a directory"),
    ("runtimeDir", lambda d: d / "afile" / "run", "Not a directory"),
    ("stateDir", lambda d: Path("/proc/virby-state"), "No such file or directory"),
    ("runtimeDir", lambda d: Path("/proc/1/virby-run"), ""),
])
def test_unusable_dirs_are_one_clear_line(key: str, make: object, expect: str) -> None:
    inst = Instance(guest_dir=None)
    try:
        (inst.dir / "afile").write_text("x")
        path = make(inst.dir)  # type: ignore[operator]
        inst2 = Instance(guest_dir=None, **{key: str(path)})
        try:
            line = one_line_error(run_once(inst2))
            assert str(path) in line or str(path.parent) in line, line
            assert expect in line, line
            assert "Traceback" not in line
        finally:
            inst2.close()
    finally:
        inst.close()


def test_read_only_state_and_runtime_dirs(tmp_path: Path) -> None:
    mnt = Path(f"/tmp/vbro{os.getpid()}")
    if not mount_tmpfs(mnt, "1m", "ro"):
        unavailable("cannot mount a read-only tmpfs here")
    try:
        for key in ("stateDir", "runtimeDir"):
            with Instance(guest_dir=None, **{key: str(mnt / "x")}) as inst:
                line = one_line_error(run_once(inst))
                assert "Read-only file system" in line and str(mnt) in line, line
    finally:
        umount(mnt)
        mnt.rmdir()


def test_runtime_dir_too_long_is_a_config_error() -> None:
    long_dir = "/tmp/" + "r" * 100
    d = Path(f"/tmp/vblong{os.getpid()}")
    d.mkdir()
    try:
        cfg = d / "config.json"
        cfg.write_text(json.dumps({"runtimeDir": long_dir, "stateDir": str(d / "state")}))
        out = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "run", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 2
        assert "runtimeDir" in out.stderr and "104" in out.stderr
        assert not Path(long_dir).exists() and not (d / "state").exists()
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_runtime_dir_is_made_private_even_if_it_existed_open() -> None:
    with Instance(guest_dir=None) as inst:
        (inst.dir / "run").mkdir(mode=0o755)
        os.chmod(inst.dir / "run", 0o755)
        inst.start()
        assert (inst.dir / "run").stat().st_mode & 0o777 == 0o700
