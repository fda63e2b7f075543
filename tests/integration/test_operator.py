"""Issue 8, operator experience: every command a person types, against a real arbiter (real
circusd, real bus, no guest: a boot fails at once and cleanly). What is asserted is what the
user sees: the text on stdout/stderr and the exit status."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.harness import Instance

pytestmark = pytest.mark.integration

VIRBY = [sys.executable, "-m", "virby.supervisor.cli"]


class Lines:
    """A running `virby …` whose stdout lines are read in a thread: wait for a line by
    content, with a deadline, never by sleeping."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*VIRBY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, needle: str, timeout: float = 15) -> str:
        """The first line (already read or still to come) that contains `needle`."""
        for line in self.seen:
            if needle in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {needle!r} within {timeout}s; saw {self.seen}")
            try:
                got = self.q.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before {needle!r}; saw {self.seen}; "
                                     f"stderr {self.proc.stderr.read() if self.proc.stderr else ''}")
            self.seen.append(got)
            if needle in got:
                return got

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def rest(self, timeout: float = 15) -> list[str]:
        """After `stop`: every line not yet waited for, up to the end of the output."""
        out = []
        while (line := self.q.get(timeout=timeout)) is not None:
            out.append(line)
        return out


@pytest.fixture
def follow() -> Iterator[list[Lines]]:
    running: list[Lines] = []
    yield running
    for r in running:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def _conf(inst: Instance) -> list[str]:
    return ["--config", str(inst.config_path)]


def _knock(inst: Instance) -> bytes:
    """One client as ssh would be: it waits, then is closed (the boot fails without a guest)."""
    with socket.create_connection(("127.0.0.1", inst.port), timeout=5) as s:
        s.settimeout(30)
        return s.recv(100)


# -- status --------------------------------------------------------------------------------------


def test_status_table_shows_state_idle_and_watchers(instance: Instance) -> None:
    out = instance.cli("status").stdout
    lines = out.splitlines()
    assert lines[0].startswith("VM          stopped since ")
    assert any(line.startswith("backend     qemu    boots 0    last cold start -") for line in lines)
    assert any(line.startswith("connections 0 open") for line in lines)
    assert any(line.startswith("idle        nothing to do (VM stopped)") for line in lines)
    header = lines.index(next(line for line in lines if line.startswith("watcher")))
    rows = {r.split()[0]: r.split() for r in lines[header + 1:]}
    for name in ("vm", "forwarder", "idle"):
        pid = instance.watcher_pid(name)
        assert rows[name][1] == "active"
        assert rows[name][3] == "0"  # restarts
        assert rows[name][4].startswith(f"{pid}-")


def test_status_json_keeps_the_old_keys_and_adds_the_new(instance: Instance) -> None:
    st = json.loads(instance.cli("status", "--json").stdout)
    later = json.loads(instance.cli("status", "--json").stdout)
    for name in ("vm", "forwarder", "idle"):
        w = st["watchers"][name]
        assert w["status"] == "active"
        assert w["incarnation"] == st["incarnations"][name]
        assert w["restarts"] == 0
        # the age of this incarnation: it counts up (an order, not a bound in seconds)
        assert 0 <= w["uptime"] <= later["watchers"][name]["uptime"]
        assert later["watchers"][name]["incarnation"] == w["incarnation"]
    assert st["vm"]["state"] == "stopped" and st["vm"]["boots"] == 0
    assert st["connections"] == 0
    assert st["hypervisor"] is None  # no VM, no process to measure
    assert st["countdown"] == {"pause_in": None, "stop_in": None}


def test_status_counts_a_restart_and_shows_the_crash_record(instance: Instance) -> None:
    old = instance.watcher_pid("idle")
    os.kill(old, signal.SIGKILL)
    instance.wait_bus(lambda s: ((s.get("vm") or {}).get("peers", {}).get("idle") or {}).get("restarts") == 1
                      and s["vm"]["peers"]["idle"].get("up"), 10, "the vm worker to see idle restarted")
    st = json.loads(instance.cli("status", "--json").stdout)
    assert st["watchers"]["idle"]["restarts"] == 1
    assert not st["watchers"]["idle"]["incarnation"].startswith(f"{old}-")
    # A crash record, as workers/runtime.py writes it before a backoff exit:
    record = {"count": 3, "reason": "RuntimeError: boom", "time": time.time() - 5, "backoff": 4}
    (instance.dir / "run" / "forwarder.failure").write_text(json.dumps(record))
    out = instance.cli("status").stdout
    # the age is counted from the record's time: 5 s, or more on a slow machine
    assert re.search(r"crashed 3x, last \d+s ago: RuntimeError: boom", out), out
    assert json.loads(instance.cli("status", "--json").stdout)["watchers"]["forwarder"]["failure"] == record


def test_status_after_a_failed_boot_names_the_reason_and_the_unserved_client(instance: Instance) -> None:
    assert _knock(instance) == b""
    instance.wait_bus(lambda s: (s.get("vm") or {}).get("state") == "failed"
                      and (s["vm"].get("forwarder") or {}).get("failed") == 1, 10, "a failed boot")
    out = instance.cli("status").stdout
    assert out.startswith("VM          failed since ")
    assert "reason      guest kernel (guest.kernel) not found" in out
    assert "connections 0 open (1 accepted, 1 closed unserved)" in out


def test_status_imports_neither_paramiko_nor_asyncio_nor_circus(instance: Instance) -> None:
    """What keeps `virby status` quick; its wall time is measured by `python -m bench status`."""
    probe = ("import sys, time; t = time.monotonic(); from virby.supervisor import cli\n"
             "try:\n cli.cli(['status', '--json', '--config', sys.argv[1]], prog_name='virby')\n"
             "except SystemExit: pass\n"
             "print(sorted(m for m in ('paramiko', 'asyncio', 'circus', 'tornado') if m in sys.modules),"
             " file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe, str(instance.config_path)], capture_output=True,
                         text=True, timeout=30, check=True)
    assert json.loads(out.stdout)["vm"]["state"] == "stopped"
    assert out.stderr.strip() == "[]"


# -- events --------------------------------------------------------------------------------------


def test_events_without_follow_prints_one_line_per_owner(instance: Instance) -> None:
    lines = instance.cli("events").stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[1] == "vm" and "stopped; boots 0; 0 connection(s) open" in lines[0]
    assert lines[1].split()[1] == "idle" and "nothing to do (VM stopped)" in lines[1]
    js = [json.loads(x) for x in instance.cli("events", "--json").stdout.splitlines()]
    assert [(j["owner"], j["kind"]) for j in js] == [("vm", "snapshot"), ("idle", "snapshot")]
    assert js[0]["state"] == "stopped"


def test_events_follow_shows_changes_once_and_ctrl_c_ends_it(instance: Instance, follow: list[Lines]) -> None:
    ev = Lines("events", "-f", *_conf(instance))
    follow.append(ev)
    ev.wait_for(" vm ")
    ev.wait_for(" idle ")
    assert _knock(instance) == b""
    ev.wait_for("stopped -> starting")
    ev.wait_for("starting -> failed (guest kernel (guest.kernel) not found")
    ev.wait_for("connections: 1 accepted")
    ev.wait_for("1 client(s) closed before the VM was ready")
    ev.wait_for("nothing to do (VM failed)")
    # a restart shows as a new incarnation
    old = instance.watcher_pid("idle")
    os.kill(old, signal.SIGKILL)
    ev.wait_for(f"idle monitor restarted (incarnation {old}-")
    # heartbeats alone print nothing: several pass, no new line, until a change
    before = len(ev.seen)
    instance.wait_bus(lambda s: (s.get("vm") or {}).get("peers", {}).get("idle", {}).get("seq", 0) > 6, 15,
                      "a few heartbeats of the new idle monitor")
    assert ev.stop() == 0
    assert ev.seen[before:] + ev.rest() == []  # heartbeats print nothing
    states = [x for x in ev.seen if "->" in x and " vm " in x]
    assert len(states) == 2, states  # stopped->starting, starting->failed: each exactly once


def test_events_json_follow(instance: Instance, follow: list[Lines]) -> None:
    ev = Lines("events", "-f", "--json", *_conf(instance))
    follow.append(ev)
    ev.wait_for('"owner": "idle"')
    _knock(instance)
    line = ev.wait_for('"state": "failed"')
    obj = json.loads(line)
    assert obj["kind"] == "state" and obj["from"] == "starting" and "guest kernel" in obj["reason"]
    assert ev.stop(signal.SIGINT) == 0


# -- logs ----------------------------------------------------------------------------------------


def test_logs_show_each_watcher_and_say_when_there_is_no_console_yet(instance: Instance) -> None:
    out = instance.cli("logs").stdout
    for name in ("vm", "forwarder", "idle"):
        assert any(line.startswith(f"[{name}] ") and "ready" in line for line in out.splitlines()), name
    assert "[circusd] " in out
    one = instance.cli("logs", "vm").stdout
    assert "vm worker ready" in one and not one.startswith("[")
    console = instance.cli("logs", "console").stdout
    assert console.startswith("[console] (no log yet at ") and "console.log" in console
    bad = instance.cli("logs", "nope", check=False)
    assert bad.returncode == 2 and "Invalid value" in bad.stderr


def test_logs_follow_prints_the_forwarders_reason_as_it_happens(instance: Instance,
                                                                follow: list[Lines]) -> None:
    lg = Lines("logs", "-f", "-n", "1", "forwarder", *_conf(instance))
    follow.append(lg)
    lg.wait_for(" forwarder[")  # the tail's one line: from here on the follower is attached
    _knock(instance)
    line = lg.wait_for("closed: boot failed: guest kernel (guest.kernel) not found")
    assert line.split()[1].startswith("forwarder[")
    assert lg.stop() == 0


# -- what a Nix user sees when the VM cannot start ------------------------------------------------


def test_a_client_gets_a_clean_close_and_the_log_names_the_cause(instance: Instance) -> None:
    out = instance.ssh("true", timeout=60)
    assert out.returncode == 255
    # OpenSSH's words for a server that closes before its banner: what `nix build` prints too
    assert "Connection closed" in out.stderr or "kex_exchange_identification" in out.stderr, out.stderr
    logs = instance.cli("logs", "forwarder").stdout
    assert "closed: boot failed: guest kernel (guest.kernel) not found" in logs
    vm = instance.cli("logs", "vm").stdout
    assert "boot failed" in vm


# -- start / ssh / forward on a VM that cannot start ---------------------------------------------


def test_start_reports_why_the_vm_cannot_start(instance: Instance) -> None:
    out = instance.cli("start", check=False)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "virby: the VM could not start: " in out.stderr
    assert "guest kernel (guest.kernel) not found" in out.stderr
    assert "virby logs vm" in out.stderr
    # not a terminal: plain progress lines, no spinner control characters
    assert "virby: booting the VM (cold start)" in out.stderr and "\r" not in out.stderr


def test_ssh_and_forward_report_the_same_without_hanging(instance: Instance) -> None:
    for args in (["ssh", *_conf(instance), "--", "true"], ["forward", *_conf(instance), "8080"]):
        out = subprocess.run([*VIRBY, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (args, out.stderr)
        assert "the VM could not start" in out.stderr and "guest kernel" in out.stderr, out.stderr


def test_commands_say_plainly_when_virby_is_not_running() -> None:
    with Instance(guest_dir=None) as inst:
        for args in (["events"], ["events", "-f"], ["start"], ["forward", "8080"]):
            out = inst.cli(*args, check=False, timeout=30)
            assert out.returncode == 1, args
            assert "virby is not running" in out.stderr, (args, out.stderr)
        ssh = subprocess.run([*VIRBY, "ssh", *_conf(inst), "--", "true"], capture_output=True, text=True,
                             timeout=30)
        assert ssh.returncode == 1 and "virby is not running" in ssh.stderr


# -- doctor --------------------------------------------------------------------------------------


def _marks(out: str) -> dict[str, str]:
    return {line[2:].split(": ")[0]: line[0] for line in out.splitlines() if line[:1] in "✓✗·"}


def test_doctor_on_a_running_virby_without_guest_files(instance: Instance) -> None:
    out = instance.cli("doctor", check=False)
    assert out.returncode == 1
    marks = _marks(out.stdout)
    assert marks["guest files"] == "✗"
    assert "fix: build the guest: `virby guest build`" in out.stdout
    for ok in ("hypervisor qemu-system-x86_64", "runtime dir", "SSH keys", "arbiter (circusd)",
               f"port 127.0.0.1:{instance.port}", "ssh_config alias virby-vm"):
        assert marks[ok] == "✓", (ok, out.stdout)
    assert marks["guest host key"] == "·" and marks["guest clock"] == "·"
    assert f"port 127.0.0.1:{instance.port}: held by this Virby's arbiter" in out.stdout
    # doctor looked without touching: no connection reached the forwarder, no boot was tried
    st = json.loads(instance.cli("status", "--json").stdout)
    assert st["vm"]["forwarder"]["accepted"] == 0 and st["vm"]["state"] == "stopped"


def test_doctor_names_bad_key_permissions_and_a_stopped_arbiter(tmp_path: Path) -> None:
    with Instance(guest_dir=None) as inst:
        inst.start()
        key = inst.dir / "state" / "ssh_user_ed25519_key"
        key.chmod(0o644)
        out = inst.cli("doctor", check=False)
        assert out.returncode == 1
        assert _marks(out.stdout)["SSH keys"] == "✗"
        assert f"{key} is mode 644" in out.stdout and "fix: chmod 600" in out.stdout
        key.chmod(0o600)
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGTERM)
        assert inst.proc.wait(60) == 0
        out = inst.cli("doctor", check=False)
        assert out.returncode == 1
        marks = _marks(out.stdout)
        assert marks["arbiter (circusd)"] == "✗" and "fix: start it: `virby run" in out.stdout
        assert marks[f"port 127.0.0.1:{inst.port}"] == "✓"  # free again
        assert "free (virby is not running)" in out.stdout


def test_doctor_names_the_program_holding_the_port() -> None:
    with socket.socket() as blocker, Instance(guest_dir=None) as inst:
        blocker.bind(("127.0.0.1", inst.port))
        blocker.listen()
        out = inst.cli("doctor", check=False)
        assert out.returncode == 1
        assert f"✗ port 127.0.0.1:{inst.port}: in use by pid {os.getpid()}" in out.stdout


# -- env, completion, help -----------------------------------------------------------------------


def test_env_then_circusctl_works(instance: Instance) -> None:
    script = f'eval "$({sys.executable} -m virby.supervisor.cli env --config {instance.config_path})" ' \
             '&& circusctl status && echo "$VIRBY_RUNTIME_DIR"'
    env = {k: v for k, v in os.environ.items() if k != "CIRCUSCTL_ENDPOINT"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sorted(lines[:3]) == ["forwarder: active", "idle: active", "vm: active"]
    assert lines[3] == str(instance.dir / "run")


def test_shell_completion_as_documented() -> None:
    env = {**os.environ, "_VIRBY_COMPLETE": "bash_source"}
    out = subprocess.run(["virby"], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0 and "complete -o nosort -F _virby_completion virby" in out.stdout
    env = {**os.environ, "_VIRBY_COMPLETE": "bash_complete", "COMP_WORDS": "virby ev", "COMP_CWORD": "1"}
    out = subprocess.run(["virby"], capture_output=True, text=True, timeout=30, env=env)
    assert "plain,events" in out.stdout.splitlines()
    env = {**os.environ, "_VIRBY_COMPLETE": "bash_complete", "COMP_WORDS": "virby logs c", "COMP_CWORD": "2"}
    out = subprocess.run(["virby"], capture_output=True, text=True, timeout=30, env=env)
    assert {"plain,circusd", "plain,console"} <= set(out.stdout.splitlines())


COMMANDS = ["run", "status", "start", "stop", "pause", "resume", "logs", "events", "doctor", "forward",
            "ssh-config", "ssh", "nix-machines", "launchd-plist", "env"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = subprocess.run([*VIRBY, command, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "Example" in out.stdout and f"virby {command.split()[0]}" in out.stdout, out.stdout
