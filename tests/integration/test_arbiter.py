"""The arbiter, for real: `virby run` -> circusd -> three watchers on the real bus."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from testing.harness import REPO, Instance, exited
from virby.supervisor import control

pytestmark = pytest.mark.integration


def test_all_three_watchers_active_and_reported(instance: Instance) -> None:
    statuses = instance.circus("status")["statuses"]
    assert statuses == {"vm": "active", "forwarder": "active", "idle": "active"}
    out = json.loads(instance.cli("status", "--json").stdout)
    for name in ("vm", "forwarder", "idle"):
        pid = instance.watcher_pid(name)
        inc = out["incarnations"][name]
        assert inc and inc.startswith(f"{pid}-"), (name, inc, pid)
        assert out["watchers"][name]["status"] == "active"
    assert out["vm"]["state"] == "stopped"
    assert out["vm"]["boots"] == 0


def _views(states: dict) -> dict[str, dict[str, str | None]]:
    """Who sees which incarnation of whom, from the broadcasts."""
    vm, idle = states["vm"], states["idle"]
    fwd = vm.get("forwarder") or {}

    def inc(view: dict, name: str) -> str | None:
        p = (view.get("peers") or {}).get(name) or {}
        return p.get("inc") if p.get("up") else None

    return {
        "vm": {"self": vm["inc"], "idle": inc(vm, "idle"), "forwarder": inc(vm, "forwarder")},
        "idle": {"self": idle["inc"], "vm": inc(idle, "vm"), "forwarder": inc(idle, "forwarder")},
        "forwarder": {"vm": inc(fwd, "vm"), "idle": inc(fwd, "idle")},
    }


@pytest.mark.parametrize("victim", ["vm", "forwarder", "idle"])
def test_kill_9_of_a_watcher_heals_and_the_others_see_it(instance: Instance, victim: str) -> None:
    pid = instance.watcher_pid(victim)
    old_inc = instance.status()["incarnations"][victim]
    assert old_inc.startswith(f"{pid}-")
    others = [n for n in ("vm", "forwarder", "idle") if n != victim]

    def healed(states: dict) -> bool:
        if "vm" not in states or "idle" not in states:
            return False
        views = _views(states)
        seen = [views[o].get(victim) for o in others]
        return all(s is not None and s != old_inc for s in seen)

    os.kill(pid, signal.SIGKILL)
    # Returns as soon as both others broadcast the new incarnation; the bound only ends a hang
    # (how fast it heals is bench's to measure, not a loaded test host's to judge).
    states = instance.wait_bus(healed, 60, f"a new {victim} seen by {others}")
    new = {_views(states)[o][victim] for o in others}
    assert len(new) == 1
    new_inc = new.pop()
    assert new_inc is not None and not new_inc.startswith(f"{pid}-")
    assert instance.watcher_pid(victim) != pid


class StandInSshd:
    """A host-side stand-in for the guest's sshd: on accept it speaks its banner (as sshd does,
    and as the forwarder waits for), then closes once the client has. Runs in a thread."""

    BANNER = b"SSH-2.0-standin\r\n"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    conn.sendall(self.BANNER)
                    while conn.recv(4096):
                        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def _use_stand_in_vm(instance: Instance, sshd: StandInSshd) -> None:
    """Swap the vm watcher's command for bench/fakevm.py, a vm worker on the real bus that says
    `running` with the stand-in sshd as the guest endpoint: the real forwarder then serves
    clients with no QEMU behind it."""
    old = instance.watcher_pid("vm")
    reply = control.circus_call(instance.config, "set", timeout=60, name="vm", waiting=True, options={
        "cmd": f"{sys.executable} -m bench.fakevm {sshd.port}", "working_dir": str(REPO)})
    assert reply.get("status") == "ok", reply
    # A reload of the vm watcher is a SIGHUP the worker ignores: restart it onto the new command.
    reply = control.circus_call(instance.config, "restart", timeout=60, name="vm", waiting=True)
    assert reply.get("status") == "ok", reply
    instance.wait_bus(lambda s: not s.get("vm", {}).get("inc", f"{old}-").startswith(f"{old}-")
                      and s["vm"].get("state") == "running"
                      and s["vm"].get("endpoint") == ["127.0.0.1", sshd.port], 20, "the stand-in vm worker")


def test_forwarder_restart_serves_every_connection(instance: Instance) -> None:
    """circusd owns the listening socket: while the forwarder restarts, clients wait in the
    backlog and the next forwarder serves them. A client counts as served when the SSH banner
    reaches it through the forwarder (connect() alone proves nothing: the kernel's backlog
    accepts it with no forwarder at all)."""
    sshd = StandInSshd()
    _use_stand_in_vm(instance, sshd)
    served: list[float] = []  # when each served connection started
    unserved: list[str] = []
    restarted_at: list[float] = []  # set once the new forwarder is up
    before_restart, after_restart = threading.Event(), threading.Event()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", instance.port), timeout=15) as s:
                    s.settimeout(15)
                    banner = s.recv(len(StandInSshd.BANNER))
            except OSError as e:
                unserved.append(f"{type(e).__name__}: {e}")
            else:
                if banner == StandInSshd.BANNER:
                    served.append(t0)
                else:
                    unserved.append(f"got {banner!r}, not the banner")
            if len(served) >= 5:
                before_restart.set()
            if restarted_at and sum(t > restarted_at[0] for t in served) >= 20:
                after_restart.set()
            stop.wait(0.025)  # a new connection every 25 ms, as a busy Nix would

    t = threading.Thread(target=client)
    t.start()
    try:
        assert before_restart.wait(30), f"the old forwarder served no 5 connections: {unserved[-3:]}"
        old = instance.watcher_pid("forwarder")
        begun = time.monotonic()
        env = {**os.environ, "CIRCUSCTL_ENDPOINT": instance.config.endpoint("ctl")}
        out = subprocess.run(["circusctl", "restart", "forwarder", "--waiting"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        instance.wait_bus(lambda s: bool((s.get("vm", {}).get("peers", {}).get("forwarder") or {}).get("up")
                          and not s["vm"]["peers"]["forwarder"]["inc"].startswith(f"{old}-")),
                          10, "the new forwarder")
        restarted_at.append(time.monotonic())
        assert after_restart.wait(30), f"fewer than 20 connections served after the restart: {unserved[-3:]}"
    finally:
        stop.set()
        t.join()
        sshd.close()
    assert unserved == []
    assert any(t0 < begun for t0 in served), "no connection went through the old forwarder"
    assert instance.watcher_pid("forwarder") != old


def test_circusctl_works_against_the_rendered_ini(instance: Instance) -> None:
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": instance.config.endpoint("ctl")}
    for name in ("vm", "forwarder", "idle"):
        out = subprocess.run(["circusctl", "status", name], env=env, capture_output=True, text=True,
                             timeout=30, check=True)
        assert out.stdout.strip() == "active"
    out = subprocess.run(["circusctl", "listsockets"], env=env, capture_output=True, text=True,
                         timeout=30, check=True)
    assert f"127.0.0.1:{instance.port}" in out.stdout


def test_the_port_is_only_in_circusd_and_the_forwarder(instance: Instance) -> None:
    def listens(pid: int) -> bool:
        return any(c.laddr and c.laddr.port == instance.port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(pid).net_connections("tcp"))

    assert listens(instance.circusd_pid())
    assert listens(instance.watcher_pid("forwarder"))
    assert not listens(instance.watcher_pid("vm"))
    assert not listens(instance.watcher_pid("idle"))


def test_sigterm_stops_everything(instance: Instance) -> None:
    assert instance.proc is not None
    children = psutil.Process(instance.proc.pid).children(recursive=True)
    assert len(children) >= 3
    instance.proc.send_signal(signal.SIGTERM)
    assert instance.proc.wait(30) == 0
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", instance.port), timeout=2)


def test_watchers_exit_when_circusd_is_killed(instance: Instance) -> None:
    pids = [instance.watcher_pid(n) for n in ("vm", "forwarder", "idle")]
    procs = [psutil.Process(p) for p in pids]
    os.kill(instance.circusd_pid(), signal.SIGKILL)
    alive = exited(procs, timeout=2.0)
    assert alive == [], f"still running: {alive}"
    # The port is free again: a new arbiter can bind and serve.
    with Instance(guest_dir=None, port=instance.port) as again:
        again.start()
        assert again.circus("status")["statuses"]["forwarder"] == "active"


def test_status_when_not_running_is_one_clear_line() -> None:
    with Instance(guest_dir=None) as inst:
        out = inst.cli("status", check=False)
        assert out.returncode == 1
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "not running" in lines[0]
        for cmd in ("start", "stop", "pause", "resume"):
            out = inst.cli(cmd, check=False)
            assert out.returncode == 1 and "not running" in out.stderr, (cmd, out.stderr)


def test_run_fails_loudly_when_the_port_is_taken() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with Instance(guest_dir=None, port=port) as inst:
            out = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "run", "--config",
                                  str(inst.config_path)], capture_output=True, text=True, timeout=30)
            assert out.returncode != 0
            assert f"127.0.0.1:{port} is already in use" in out.stderr
            assert f"pid {os.getpid()}" in out.stderr


def test_a_boot_without_guest_files_is_a_failed_state_with_the_reason(instance: Instance) -> None:
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as s:
        s.settimeout(30)
        assert s.recv(100) == b""  # closed by the forwarder, not left hanging
    vm = instance.wait_vm("failed", timeout=10)
    assert "guest kernel (guest.kernel) not found" in vm["reason"]
    instance.wait_log("forwarder", "closed: boot failed: guest kernel (guest.kernel) not found")
