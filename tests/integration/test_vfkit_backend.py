"""vfkit's REST client, and the vfkit backend's lifecycle, against a stand-in vfkit process.

No macOS here, so `FAKE_VFKIT` plays vfkit's documented part: a REST server on the unix socket
named by `--restful-uri` that answers like vfkit's handlers (GET /vm/state with the raw
Virtualization.framework state names; 202 to an accepted POST, 400 to bad JSON, 500 when the
framework refuses a transition; GET /vm/inspect with the devices as vfkit's JSON, a
`virtio-serial,pty` one carrying the `ptyName` of the pty it made; exit once the VM stops), and
a guest agent on that pty's other side (vfkit keeps both ends open and sets the master raw, as
here). Every request and every line the guest gets goes to a JSON-lines log the tests read back.
The real agent runs under QEMU in vfkit's layout (tests/e2e/test_mac_layout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from virby.core.config import from_dict
from virby.core.keys import ensure_keys
from virby.workers.backends.base import BackendError, Endpoint
from virby.workers.backends.process import PidRecord
from virby.workers.backends.vfkit import VfkitBackend
from virby.workers.backends.vfkit import backend as vfkit_mod
from virby.workers.backends.vfkit.rest import VfkitRest, VmState

pytestmark = pytest.mark.integration

FAKE_VFKIT = textwrap.dedent('''\
    import http.server, json, os, socket, socketserver, sys, threading, time

    MODE = set(filter(None, os.environ.get("FAKE_VFKIT_MODE", "").split(",")))
    LOG = os.environ["FAKE_VFKIT_LOG"]
    args = sys.argv[1:]
    rest = None
    devices = []
    master = None
    for i, a in enumerate(args):
        if a == "--restful-uri":
            rest = args[i + 1].removeprefix("unix://")
        if a == "--device" and args[i + 1] == "virtio-serial,pty" and "no-pty" not in MODE:
            import pty, tty
            master, slave = pty.openpty()
            tty.setraw(master)
            devices.append({"kind": "virtioserial", "usesPty": True, "ptyName": os.ttyname(slave)})
        elif a == "--device" and args[i + 1].startswith("virtio-serial,logFilePath="):
            devices.append({"kind": "virtioserial", "logFile": args[i + 1].partition("=")[2]})

    def record(**entry):
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\\n")

    record(argv=sys.argv)
    if "exit-at-start" in MODE:
        print("Error: kernel is compressed, vfkit needs an uncompressed kernel", file=sys.stderr)
        sys.exit(1)

    state = {"s": "VirtualMachineStateRunning"}
    stopping = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, code, body=None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            if body is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            record(method="GET", path=self.path)
            if self.path == "/vm/state" and "hang-state" in MODE and os.path.exists(LOG + ".hang"):
                threading.Event().wait()  # a vfkit whose VZ queue is stuck: never answers
            if self.path == "/vm/state":
                s = state["s"]
                self.reply(200, {"state": s, "canStart": False,
                                 "canPause": s.endswith("Running"),
                                 "canResume": s.endswith("Paused"),
                                 "canStop": s.endswith("Running"), "canHardStop": True})
                if "die-after-first-get" in MODE:
                    stopping.set()
            elif self.path == "/vm/inspect":
                self.reply(200, {"vcpus": 2, "memoryBytes": 1 << 30, "devices": devices})
            else:
                data = b"404 page not found"
                self.send_response(404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body = json.loads(raw)
                want = body["state"]
                assert isinstance(want, str)
            except Exception as e:
                record(method="POST", path=self.path, raw=raw.decode("latin-1"))
                return self.reply(400, {"error": f"json: cannot unmarshal: {e}"})
            record(method="POST", path=self.path, body=body)
            s = state["s"]
            moves = {("Pause", "VirtualMachineStateRunning"): "VirtualMachineStatePaused",
                     ("Resume", "VirtualMachineStatePaused"): "VirtualMachineStateRunning"}
            if (want, s) in moves:
                state["s"] = moves[(want, s)]
            elif want == "Stop" and s.endswith("Running"):
                if "ignore-stop" not in MODE:
                    state["s"] = "VirtualMachineStateStopping"
                    stopping.set()
            elif want == "HardStop":
                state["s"] = "VirtualMachineStateStopped"
                stopping.set()
            elif want in ("Pause", "Resume", "Stop"):
                return self.reply(500, {"error": "Invalid virtual machine state transition"})
            else:
                return self.reply(500, {"error": f"invalid new VMState: {want}"})
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(rest, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("listening", flush=True)

    def say(text):
        os.write(master, text.encode())

    def agent():
        """The guest agent's half of the line protocol, on the pty's master side."""
        if "noise-first" in MODE:  # the kernel's console lines, a garbled word: not the agent
            say("[    0.52] hvc1: console noise\\nvirby-ready-ish\\n")
        buf = b""
        while True:
            try:
                data = os.read(master, 1024)
            except OSError:
                return
            buf += data
            while b"\\n" in buf:
                line, _, buf = buf.partition(b"\\n")
                line = line.decode()
                record(agent=line)
                if "silent-agent" in MODE:
                    continue
                if line == "hello":
                    say("virby-booting\\n" if "booting-forever" in MODE else "virby-ready 192.168.64.7\\n")
                elif line.startswith("time "):
                    say("virby-time-ok\\n")
                elif line == "poweroff" and "ignore-poweroff" not in MODE:
                    state["s"] = "VirtualMachineStateStopped"
                    stopping.set()
                elif line != "poweroff":
                    say("virby-error unknown\\n")

    if master is not None:
        threading.Thread(target=agent, daemon=True).start()

    stopping.wait()
    time.sleep(0.05)  # let the reply that stopped us leave
    record(exit=True)
    os._exit(3 if "die-after-first-get" in MODE else 0)
''')


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay short (104 bytes on macOS, 108 here)."""
    d = tempfile.mkdtemp(prefix="vfk", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake_vfkit(short_dir: Path) -> Path:
    path = short_dir / "vfkit"
    path.write_text(f"#!{sys.executable}\n" + FAKE_VFKIT)
    path.chmod(0o755)
    return path


def _log(short_dir: Path) -> list[dict]:
    try:
        text = (short_dir / "fake.log").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def _agent_lines(short_dir: Path) -> list[str]:
    return [e["agent"] for e in _log(short_dir) if "agent" in e]


def _requests(short_dir: Path) -> list[tuple[str, str, object]]:
    return [(e["method"], e["path"], e.get("body", e.get("raw")))
            for e in _log(short_dir) if "method" in e]


# -- the REST client on its own ----------------------------------------------------------------


@pytest.fixture
def rest_server(short_dir: Path, fake_vfkit: Path, monkeypatch) -> Iterator[VfkitRest]:
    sock = short_dir / "rest.sock"
    env = {**os.environ, "FAKE_VFKIT_LOG": str(short_dir / "fake.log")}
    proc = subprocess.Popen([str(fake_vfkit), "--restful-uri", f"unix://{sock}"], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "listening\n"
    yield VfkitRest(str(sock), timeout=5)
    proc.kill()
    proc.wait()


def test_state_reads_vfkits_reply(rest_server: VfkitRest) -> None:
    state = asyncio.run(rest_server.state())
    assert state == VmState(raw="VirtualMachineStateRunning", can_pause=True, can_resume=False,
                            can_stop=True, can_hard_stop=True)
    assert state.state == "running"


def test_pause_and_resume_send_vfkits_bodies(rest_server: VfkitRest, short_dir: Path) -> None:
    async def go() -> list[str]:
        seen: list[str] = []
        await rest_server.change_state("Pause")
        seen.append((await rest_server.state()).state)
        await rest_server.change_state("Resume")
        seen.append((await rest_server.state()).state)
        return seen

    assert asyncio.run(go()) == ["paused", "running"]
    posts = [r for r in _requests(short_dir) if r[0] == "POST"]
    assert posts == [("POST", "/vm/state", {"state": "Pause"}),
                     ("POST", "/vm/state", {"state": "Resume"})]


def test_stop_is_accepted_with_202(rest_server: VfkitRest, short_dir: Path) -> None:
    asyncio.run(rest_server.change_state("Stop"))
    assert ("POST", "/vm/state", {"state": "Stop"}) in _requests(short_dir)


def test_refused_transition_is_a_backend_error_with_vfkits_reason(rest_server: VfkitRest) -> None:
    with pytest.raises(BackendError, match="HTTP 500: Invalid virtual machine state transition"):
        asyncio.run(rest_server.change_state("Resume"))  # it is running, not paused


def test_bad_json_is_a_400(rest_server: VfkitRest) -> None:
    with pytest.raises(BackendError, match=r"POST /vm/state: HTTP 400: json: cannot unmarshal"):
        asyncio.run(rest_server.request("POST", "/vm/state", {"state": 5}))


def test_unknown_path_is_a_404_with_the_text_body(rest_server: VfkitRest) -> None:
    with pytest.raises(BackendError, match="HTTP 404: 404 page not found"):
        asyncio.run(rest_server.request("GET", "/vm/nothing"))


def test_unknown_action_is_refused_before_sending(rest_server: VfkitRest,
                                                  short_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown vfkit state change"):
        asyncio.run(rest_server.change_state("Reboot"))
    assert not [r for r in _requests(short_dir) if r[0] == "POST"]


# -- the backend's lifecycle against the stand-in ----------------------------------------------


@pytest.fixture
def make_backend(short_dir: Path, fake_vfkit: Path, monkeypatch):
    monkeypatch.setenv("FAKE_VFKIT_LOG", str(short_dir / "fake.log"))
    monkeypatch.setattr(vfkit_mod, "cpu_brand", lambda: None)
    guest = short_dir / "guest"
    guest.mkdir()
    (guest / "Image").write_bytes(b"MZ" + bytes(54) + b"ARM\x64" + bytes(8))  # arm64 Image header magic at 56
    (guest / "initrd").write_bytes(b"070701")
    state = short_dir / "state"
    keys = ensure_keys(str(state))
    config = from_dict({
        "backend": "vfkit", "hypervisor": str(fake_vfkit), "cores": 2, "memory": "1GiB",
        "diskSize": "1GiB", "stateDir": str(state), "runtimeDir": str(short_dir / "run"),
        "guest": {"kernel": str(guest / "Image"), "initrd": str(guest / "initrd"),
                  "cmdline": "console=hvc0"},
    })
    made: list[VfkitBackend] = []

    def make() -> VfkitBackend:
        b = VfkitBackend(config, keys)
        made.append(b)
        return b

    yield make
    for b in made:  # never leave a stand-in running
        if (pid := b.pid()) is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_boot_announce_pause_resume_shutdown(make_backend, short_dir: Path) -> None:
    b = make_backend()

    async def go() -> list[str]:
        seen = []
        await b.boot()
        pid = b.pid()
        assert pid is not None
        record = PidRecord.load(b.pid_path)
        assert record is not None and record.pid == pid
        # vfkit was given the guest's initrd with the keys cpio appended
        booted = Path(b.boot_initrd).read_bytes()
        assert booted.startswith(b"070701") and b"etc/virby/authorized_keys" in booted
        await asyncio.wait_for(b.wait_announced(), 10)
        assert b.endpoint() == Endpoint("192.168.64.7", 22)
        seen.append(await b.status())
        await b.pause()
        seen.append(await b.status())
        await b.pause()  # idempotent: no second POST
        await b.resume()
        seen.append(await b.status())
        await b.shutdown(5)
        seen.append(await b.status())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        return seen

    assert asyncio.run(go()) == ["running", "paused", "running", "stopped"]
    posts = [r[2] for r in _requests(short_dir) if r[0] == "POST"]
    assert posts == [{"state": "Pause"}, {"state": "Resume"}]  # the stop went through the agent
    said = _agent_lines(short_dir)
    assert said[0] == "hello" and said[-1] == "poweroff"
    assert ("GET", "/vm/inspect", None) in _requests(short_dir)  # where the agent's pty is
    assert not os.path.exists(b.pid_path)
    assert not os.path.exists(b.ip_path)
    assert not os.path.exists(b.boot_initrd)  # it holds the guest's private host key
    assert b.pid() is None


def test_vfkit_failing_at_start_is_reported_with_its_message(make_backend, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "exit-at-start")
    b = make_backend()
    with pytest.raises(BackendError, match=r"vfkit exited with status 1 at start: "
                                           r"Error: kernel is compressed"):
        asyncio.run(b.boot())
    assert b.pid() is None
    assert not os.path.exists(b.pid_path)


def test_vfkit_dying_before_the_announcement(make_backend, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "silent-agent,die-after-first-get")
    b = make_backend()

    async def go() -> None:
        await b.boot()
        await asyncio.wait_for(b.wait_announced(), 10)

    with pytest.raises(BackendError, match=r"vfkit exited \(status 3\) before the guest "
                                           r"announced itself"):
        asyncio.run(go())


def test_console_noise_before_the_announcement_is_not_an_announcement(
        make_backend, monkeypatch, short_dir: Path) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "noise-first")
    b = make_backend()

    async def go() -> Endpoint:
        await b.boot()
        await asyncio.wait_for(b.wait_announced(), 10)
        endpoint = b.endpoint()
        await b.shutdown(5)
        return endpoint

    assert asyncio.run(go()) == Endpoint("192.168.64.7", 22)
    assert "hello" in _agent_lines(short_dir)  # it was the answer to a hello that counted


def test_a_guest_ignoring_the_agents_poweroff_is_stopped_through_vfkit(
        make_backend, monkeypatch, short_dir: Path) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "ignore-poweroff")
    b = make_backend()

    async def go() -> str:
        await b.boot()
        await b.shutdown(0.3)
        return await b.status()

    assert asyncio.run(go()) == "stopped"
    assert _agent_lines(short_dir)[-1] == "poweroff"
    posts = [r[2] for r in _requests(short_dir) if r[0] == "POST"]
    assert posts == [{"state": "Stop"}]


def test_guest_ignoring_stop_is_hard_stopped(make_backend, monkeypatch, short_dir: Path) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "ignore-poweroff,ignore-stop")
    monkeypatch.setattr(vfkit_mod, "REST_STOP_WAIT", 0.3)
    b = make_backend()

    async def go() -> str:
        await b.boot()
        await b.shutdown(0.3)
        return await b.status()

    assert asyncio.run(go()) == "stopped"
    assert _agent_lines(short_dir)[-1] == "poweroff"
    posts = [r[2] for r in _requests(short_dir) if r[0] == "POST"]
    assert posts == [{"state": "Stop"}, {"state": "HardStop"}]


def test_shutdown_resumes_a_paused_guest_first(make_backend, short_dir: Path) -> None:
    b = make_backend()

    async def go() -> None:
        await b.boot()
        await b.pause()
        await b.shutdown(5)

    asyncio.run(go())
    posts = [r[2] for r in _requests(short_dir) if r[0] == "POST"]
    assert posts == [{"state": "Pause"}, {"state": "Resume"}]
    assert _agent_lines(short_dir)[-1] == "poweroff"


def test_a_new_worker_adopts_the_running_vm(make_backend) -> None:
    first, second = make_backend(), make_backend()

    async def go() -> tuple[bool, str, Endpoint, int | None]:
        await first.boot()
        await asyncio.wait_for(first.wait_announced(), 10)
        await first.close()  # the old worker goes away; vfkit stays
        adopted = await second.adopt()
        # the running guest answers the new worker's hello (the bound only ends a hang)
        await asyncio.wait_for(second.wait_announced(), 30)
        result = (adopted, await second.status(), second.endpoint(), second.pid())
        await second.shutdown(5)
        return result

    adopted, status, endpoint, pid = asyncio.run(go())
    assert (adopted, status, endpoint) == (True, "running", Endpoint("192.168.64.7", 22))
    assert pid is not None


def test_adoption_survives_virby_run_clearing_the_runtime_dir(make_backend) -> None:
    from virby.supervisor.arbiter import clean_runtime_dir

    first, second = make_backend(), make_backend()

    async def go() -> tuple[bool, str]:
        await first.boot()
        await first.close()
        clean_runtime_dir(first.config)  # what a restarted `virby run` does before circusd
        adopted = await second.adopt()
        status = await second.status()
        await second.shutdown(5)
        return adopted, status

    assert asyncio.run(go()) == (True, "running")


def test_an_uncontrollable_vfkit_is_killed_not_left_on_the_disk(make_backend) -> None:
    first, second = make_backend(), make_backend()

    async def go() -> tuple[bool, int]:
        await first.boot()
        pid = first.pid()
        assert pid is not None
        await first.close()
        os.unlink(first.rest_socket)  # its REST API is gone: nobody can stop it cleanly
        return await second.adopt(), pid

    adopted, pid = asyncio.run(go())
    assert adopted is False
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not os.path.exists(second.pid_path)


def test_adopt_with_nothing_there_cleans_up(make_backend) -> None:
    b = make_backend()
    os.makedirs(b.config.runtimeDir, exist_ok=True)
    # A record of a process that is long gone (pid 1's create time never matches ours).
    PidRecord(1, 0.0, ["vfkit"]).save(b.pid_path)
    with open(b.ip_path, "w") as f:
        f.write("192.168.64.7\n")
    assert asyncio.run(b.adopt()) is False
    assert not os.path.exists(b.pid_path)
    assert not os.path.exists(b.ip_path)
    assert asyncio.run(b.status()) == "stopped"


def test_kill_is_immediate_and_idempotent(make_backend) -> None:
    b = make_backend()

    async def go() -> int:
        await b.boot()
        pid = b.pid()
        assert pid is not None
        await b.kill()
        await b.kill()
        return pid

    pid = asyncio.run(go())
    assert b.pid() is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_sync_clock_sets_the_guest_time_through_the_agent(make_backend, short_dir: Path) -> None:
    b = make_backend()

    async def go() -> tuple[float, float]:
        await b.boot()
        await asyncio.wait_for(b.wait_announced(), 10)
        before = time.time()
        await b.sync_clock()
        while not any(line.startswith("time ") for line in _agent_lines(short_dir)):
            await asyncio.sleep(0.01)  # the guest reads it from the pty a moment later
        after = time.time()  # a slow answer sends the time again: each one is the host's
        await b.shutdown(5)
        return before, after

    before, after = asyncio.run(go())
    sent = [line for line in _agent_lines(short_dir) if line.startswith("time ")]
    assert sent and all(round(before) <= int(line.split()[1]) <= round(after) + 1 for line in sent)


@pytest.mark.parametrize("how", ["SIGSTOP", "stuck REST"])
def test_a_frozen_vfkit_fails_the_liveness_ping_and_says_why(make_backend, monkeypatch,
                                                             short_dir: Path, how: str) -> None:
    """The vm worker's liveness watch (`ping`) against a vfkit that stops answering: stopped
    by a signal (then `stopped()` says so, and one miss is enough), or serving no request."""
    monkeypatch.setenv("FAKE_VFKIT_MODE", "hang-state")
    b = make_backend()

    async def go() -> tuple[str, bool]:
        await b.boot()
        await asyncio.wait_for(b.wait_announced(), 10)
        await b.ping(5)  # answers while it runs
        pid = b.pid()
        assert pid is not None
        if how == "SIGSTOP":
            os.kill(pid, signal.SIGSTOP)
        else:
            (short_dir / "fake.log.hang").touch()
        try:
            with pytest.raises(BackendError) as err:
                await b.ping(0.5)
            stopped = b.stopped()
        finally:
            os.kill(pid, signal.SIGCONT)
            (short_dir / "fake.log.hang").unlink(missing_ok=True)
        await b.ping(5)  # continued: it answers again
        await b.kill()
        return str(err.value), stopped

    reason, stopped = asyncio.run(go())
    assert reason.startswith("vfkit did not answer a status query: no answer within 0.5s"), reason
    if how == "SIGSTOP":
        assert stopped and "is stopped: SIGSTOP or a debugger" in reason
    else:
        assert not stopped and "is stopped" not in reason


def test_sync_clock_without_an_agent_only_logs(make_backend, monkeypatch, caplog) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "no-pty")  # a vfkit that reports no pty
    b = make_backend()

    async def go() -> None:
        await b.boot()
        await b.sync_clock()  # a warning, no exception
        await b.shutdown(5)

    asyncio.run(go())
    assert "no channel to the guest agent" in caplog.text


def lease_for(b: VfkitBackend, short_dir: Path) -> None:
    """A DHCP lease for the backend's MAC at 127.0.0.1, in bootpd's spelling (no leading zeros)."""
    octets = ":".join(format(int(x, 16), "x") for x in b.mac.split(":"))
    b.leases_path = str(short_dir / "dhcpd_leases")
    Path(b.leases_path).write_text(
        "{\n\tname=virby-vm\n\tip_address=127.0.0.1\n"
        f"\thw_address=1,{octets}\n\tidentifier=1,{octets}\n\tlease=0x7fffffff\n}}\n")


@pytest.mark.parametrize("mode", ["silent-agent", "no-pty"])
def test_lease_fallback_finds_a_silent_guest_at_once(make_backend, monkeypatch, short_dir: Path,
                                                     mode: str) -> None:
    """The fallback is no longer 15 s away: with a silent agent (or none) it starts at once."""
    monkeypatch.setenv("FAKE_VFKIT_MODE", mode)
    b = make_backend()

    async def go() -> Endpoint:
        # A local "sshd": the probe only needs the port to accept.
        sshd = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = sshd.sockets[0].getsockname()[1]
        monkeypatch.setattr(vfkit_mod, "SSH_PORT", port)
        lease_for(b, short_dir)
        async with sshd:
            await b.boot()
            await asyncio.wait_for(b.wait_announced(), 5)
            endpoint = b.endpoint()
            await b.kill()
        return endpoint

    endpoint = asyncio.run(go())
    assert endpoint.host == "127.0.0.1"


def test_an_agent_that_has_spoken_is_waited_for_not_bypassed_by_the_lease(
        make_backend, monkeypatch, short_dir: Path) -> None:
    """A guest whose agent says "booting" is not ready, whatever its port 22 and lease say:
    readiness is the agent's event once it speaks."""
    monkeypatch.setenv("FAKE_VFKIT_MODE", "booting-forever")
    b = make_backend()

    async def go() -> None:
        sshd = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        monkeypatch.setattr(vfkit_mod, "SSH_PORT", sshd.sockets[0].getsockname()[1])
        lease_for(b, short_dir)
        async with sshd:
            await b.boot()
            try:
                await asyncio.wait_for(b.wait_announced(), 3)
            finally:
                await b.kill()

    with pytest.raises(TimeoutError):
        asyncio.run(go())
    assert "hello" in _agent_lines(short_dir)


def test_lease_fallback_gives_up_with_a_clear_reason(make_backend, monkeypatch,
                                                     short_dir: Path) -> None:
    monkeypatch.setenv("FAKE_VFKIT_MODE", "silent-agent")
    monkeypatch.setattr(vfkit_mod, "LEASE_BUDGET", 0.3)
    b = make_backend()
    b.leases_path = str(short_dir / "no_leases_here")

    async def go() -> None:
        await b.boot()
        try:
            await asyncio.wait_for(b.wait_announced(), 10)
        finally:
            await b.kill()

    with pytest.raises(BackendError) as err:
        asyncio.run(go())
    text = str(err.value)
    assert "the guest agent said nothing within 0.3s" in text
    assert "no_leases_here" in text and b.mac in text and "found no lease" in text
