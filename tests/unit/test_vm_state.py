"""The vm worker's state machine with a fake backend and a fake bus: no processes, no sockets.

Each test drives `VMWorker.handle` (the commands the forwarder, idle monitor and CLI send) and
`on_message` (the forwarders' broadcasts) and checks what a client would be told."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from virby.core import protocol
from virby.core.config import Config, from_dict
from virby.core.keys import KeyPaths, ensure_keys
from virby.core.sshcheck import SSHNotReady
from virby.workers import bus, vm
from virby.workers.backends.base import Backend, BackendError, Endpoint
from virby.workers.stop_intent import interpret


class FakeBackend(Backend):
    """Counts calls; `boot_error`/`announce` shape the next boot."""

    name = "fake"

    def __init__(self, config: Config, keys: KeyPaths) -> None:
        super().__init__(config, keys)
        self.calls: list[str] = []
        self.running = False
        self.boot_error: BaseException | None = None
        self.announce = asyncio.Event()
        self.announce.set()
        self.awaiting_announce = asyncio.Event()  # someone waits for the guest's announcement
        self.exit = asyncio.Event()
        self.broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.adoptable: str | None = None  # the status a previous worker's VM has
        self.save_found: str | None = None  # what adopted_save finds
        self.frozen = False  # status() never answers (a hung or SIGSTOPped hypervisor)
        self.process_stopped = False  # what `stopped()` sees: the process itself is stopped

    def check(self) -> None: ...
    def command(self) -> list[str]:
        return ["fake"]

    async def boot(self) -> None:
        self.calls.append("boot")
        await asyncio.sleep(0)
        if self.boot_error is not None:
            raise self.boot_error
        self.running = True

    async def wait_announced(self) -> None:
        self.awaiting_announce.set()
        await self.announce.wait()

    def endpoint(self) -> Endpoint:
        if not self.running:
            raise BackendError("the VM is not running")
        return Endpoint("127.0.0.1", 2222)

    async def pause(self) -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("resume")

    async def shutdown(self, timeout: float) -> None:
        self.calls.append("shutdown")
        self.running = False

    async def kill(self) -> None:
        self.calls.append("kill")
        self.running = False

    async def close(self) -> None:
        self.calls.append("close")

    async def status(self) -> protocol.VmState:
        if self.frozen:
            await asyncio.Future()
        return "running" if self.running else "stopped"

    async def adopted_save(self) -> str | None:
        return self.save_found

    async def finish_suspend(self, timeout: float) -> None:
        self.calls.append("finish_suspend")
        self.running = False

    async def sync_guest(self, seed: bytes) -> None:
        self.calls.append("sync_guest")

    async def wait_exit(self) -> None:
        await self.exit.wait()

    async def wait_broken(self) -> str:
        return await self.broken

    async def adopt(self) -> bool:
        if self.adoptable is None:
            return False
        self.running = True
        self.failure = "qemu reports guest-panicked; console: Kernel panic - not syncing"
        return True

    def pid(self) -> int | None:
        return 4242 if self.running else None

    def stopped(self) -> bool:
        return self.process_stopped

    def console_tail(self, lines: int = 15) -> str:
        return "booting\nlast console words"


class FakeNode:
    """What the worker asks of its bus node: a state source, and `changed()` on a change."""

    def __init__(self) -> None:
        self.source: Callable[[], Any] = dict
        self.peers = {n: bus.Peer(n) for n in ("forwarder", "idle")}
        self.sent: list[dict[str, Any]] = []  # each state published, as the node reads it

    def use_state(self, source: Callable[[], Any]) -> None:
        self.source = source

    def changed(self) -> None:
        state = dict(self.source())
        if not self.sent or self.sent[-1] != state:
            self.sent.append(state)


@pytest.fixture
def config() -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="vb") as d:
        yield from_dict({"stateDir": f"{d}/state", "runtimeDir": f"{d}/run", "readyTimeout": 2,
                         "guest": {"kernel": f"{d}/k", "initrd": f"{d}/i"}})


@pytest.fixture(autouse=True)
def every_transition_is_in_the_table(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every scenario here drives the worker through real paths: none may take a transition
    that core/protocol.py's table does not list."""
    yield
    illegal = [r.getMessage() for r in caplog.records if "illegal VM state transition" in r.getMessage()]
    assert not illegal


@pytest.fixture(autouse=True)
def no_real_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "prove_ssh", lambda *a: None)


def run(test: Callable[[vm.VMWorker, FakeBackend], Any], config: Config) -> None:
    async def main() -> None:
        os.makedirs(config.runtimeDir, exist_ok=True)
        keys = ensure_keys(config.stateDir)
        backend = FakeBackend(config, keys)
        worker = vm.VMWorker(config, backend, keys, FakeNode())  # type: ignore[arg-type]
        await asyncio.wait_for(test(worker, backend), 20)

    asyncio.run(main())


def connections(open_: int, inc: str = "1-1", seq: int = 1) -> bus.Message:
    data = {"open": open_, "last_activity": time.time()}
    return bus.Message("state", "forwarder", inc, seq, time.time(), data)


async def booted(worker: vm.VMWorker) -> None:
    ok, err, st = await worker.handle("wake", {"wait": 5})
    assert ok and st["state"] == "running", err


# -- wakes and boots --------------------------------------------------------------------------


def test_wakes_during_starting_share_one_boot(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.announce.clear()
        wakes = [asyncio.create_task(worker.handle("wake", {"wait": 5})) for _ in range(20)]
        await backend.awaiting_announce.wait()
        assert worker.state == "starting" and not any(w.done() for w in wakes)
        backend.announce.set()
        replies = await asyncio.gather(*wakes)
        assert all(ok for ok, _, _ in replies)
        assert backend.calls.count("boot") == 1 and worker.boots == 1

    run(t, config)


@pytest.mark.parametrize("error", [
    psutil.NoSuchProcess(123),
    ValueError("could not deserialize key data"),
    BackendError("guest kernel (guest.kernel) not found: /k"),
    OSError(28, "No space left on device"),
    RuntimeError("a bug\nwith a second line"),
], ids=["NoSuchProcess", "ValueError", "BackendError", "OSError", "RuntimeError"])
def test_boot_exception_does_not_wedge_starting(config: Config, error: BaseException) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.boot_error = error
        waiting = [asyncio.create_task(worker.handle("wake", {"wait": 5})) for _ in range(3)]
        replies = await asyncio.gather(*waiting)
        # every waiting client is released with the reason, on one line
        for ok, err, st in replies:
            assert not ok and err is not None and err.startswith("boot failed: ")
            assert "\n" not in str(st["reason"])
        assert worker.state == "failed"
        assert "kill" in backend.calls  # the hypervisor is ended
        assert worker.reason is not None and worker.reason.endswith("; console: last console words")
        # within the backoff: refused at once, no second boot
        ok, err, _ = await worker.handle("wake", {"wait": 5})
        assert not ok and err is not None and "next try in" in err
        assert backend.calls.count("boot") == 1
        # after the backoff the next wake boots again
        worker.retry_at = time.time() - 1
        backend.boot_error = None
        await booted(worker)
        assert backend.calls.count("boot") == 2 and worker.failures == 0

    run(t, config)


def test_a_damaged_key_file_is_a_failed_boot(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        with open(KeyPaths.in_dir(config.stateDir).client_key, "w") as f:
            f.write("not a key\n")
        ok, err, st = await worker.handle("wake", {"wait": 5})
        assert not ok and st["state"] == "failed" and err is not None
        assert "ValueError" in str(st["reason"]) and backend.calls == ["kill"]

    run(t, config)


def test_a_guest_that_never_announces_fails_with_the_timeout(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.announce.clear()
        ok, _, st = await worker.handle("wake", {"wait": 5})
        assert not ok and str(st["reason"]).startswith("guest not ready within 2s")
        assert backend.calls == ["boot", "kill"]

    run(t, config)


def test_an_ssh_proof_that_never_passes_is_a_failed_boot(config: Config,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise SSHNotReady("host key mismatch")

    monkeypatch.setattr(vm, "prove_ssh", refuse)

    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        ok, _, st = await worker.handle("wake", {"wait": 5})
        assert not ok and "the SSH check failed: host key mismatch" in str(st["reason"])

    run(t, config)


def test_a_hypervisor_exit_while_running_is_stopped_and_the_next_wake_boots(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        backend.exit.set()
        assert await worker.wait_for(("stopped",), 5)
        assert worker.reason == "the hypervisor exited unexpectedly"
        backend.exit.clear()
        await booted(worker)
        assert worker.boots == 2

    run(t, config)


def test_guest_panicked_is_failed(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        backend.broken.set_result("qemu reports guest-panicked; console: Kernel panic - not syncing")
        assert await worker.wait_for(("failed",), 5)
        assert worker.reason == "qemu reports guest-panicked; console: Kernel panic - not syncing"
        assert backend.calls[-1] == "kill" and backend.pid() is None
        ok, err, _ = await worker.handle("wake", {"wait": 1})
        assert not ok and err is not None and "guest-panicked" in err

    run(t, config)


def test_an_adopted_broken_guest_is_failed(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.adoptable = "failed"
        backend.status = lambda: _const("failed")  # type: ignore[method-assign]
        await worker.adopt()
        assert worker.state == "failed" and "guest-panicked" in (worker.reason or "")
        assert "kill" in backend.calls

    run(t, config)


async def _const(value: protocol.VmState) -> protocol.VmState:
    return value


# -- idle requests and races ------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["stop", "pause"])
def test_stop_and_pause_are_refused_while_connections_are_open(config: Config, cmd: str) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        await worker.on_message(connections(1), bus.Peer("forwarder"), False)
        ok, err, st = await worker.handle(cmd, {"if_idle": True, "idle_since": time.time() - 60})
        assert not ok and err == "busy: 1 connection(s) open" and st["state"] == "running"
        assert "shutdown" not in backend.calls and "pause" not in backend.calls
        await worker.on_message(connections(0, seq=2), bus.Peer("forwarder"), False)
        ok, err, st = await worker.handle(cmd, {"if_idle": True, "idle_since": time.time()})
        assert ok, err
        assert st["state"] == ("stopped" if cmd == "stop" else "paused")

    run(t, config)


def test_a_connection_opening_while_paused_resumes(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        ok, err, _ = await worker.handle("pause", {"if_idle": True, "idle_since": time.time()})
        assert ok and worker.state == "paused", err
        await worker.on_message(connections(1), bus.Peer("forwarder"), False)
        assert await worker.wait_for(("running",), 5)
        assert backend.calls.count("resume") == 1 and worker.boots == 1

    run(t, config)


def test_a_pause_racing_a_wake_is_refused(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        idle_since = time.time()
        async with worker._lock:  # a pause decided on an idle period gets queued behind a transition
            pause = asyncio.create_task(worker.handle("pause", {"if_idle": True, "idle_since": idle_since}))
            await asyncio.sleep(0.01)
            await worker.handle("wake", {"wait": 0})  # a client arrives meanwhile
        ok, _, st = await pause
        assert not ok and st["state"] == "running" and "pause" not in backend.calls

    run(t, config)


def test_a_wake_while_paused_resumes_without_a_boot(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        await worker.handle("pause", {})
        await booted(worker)
        assert backend.calls.count("boot") == 1 and backend.calls.count("resume") == 1

    run(t, config)


# -- the end of the worker --------------------------------------------------------------------


def test_circusctl_restart_vm_keeps_guest(config: Config) -> None:
    """Kept: the control channel is released, the hypervisor left running for the next worker."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        await worker.close(keep=True)
        assert backend.calls[-1] == "close" and backend.running
        assert "shutdown" not in backend.calls and "kill" not in backend.calls

    run(t, config)


@pytest.mark.parametrize("orphaned", [False, True])
def test_an_ending_arbiter_shuts_the_vm_down(config: Config, orphaned: bool) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        await worker.close(keep=True, orphaned=orphaned) if orphaned else await worker.close(keep=False)
        assert backend.calls[-1] == "shutdown" and worker.state == "stopped"

    run(t, config)


def test_stop_during_boot_kills_the_starting_guest_at_once(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.announce.clear()
        waiting = asyncio.create_task(worker.handle("wake", {"wait": 5}))
        await backend.awaiting_announce.wait()
        await worker.close(keep=True)  # even a restart: a half-booted guest cannot be adopted
        assert backend.calls == ["boot", "kill"] and worker.state == "stopped"
        ok, _, _ = await waiting
        assert not ok

    run(t, config)


@pytest.mark.parametrize(("reason", "keep"), [
    ("arbiter is already running arbiter_stop command", False),
    ("arbiter is already running watcher_stop command", False),
    ("arbiter is already running arbiter_stop_watchers command", False),
    ("arbiter is already running arbiter_rm_watcher command", False),
    ("arbiter is already running watcher_restart command", True),
    ("arbiter is already running arbiter_reload command", True),
    ("arbiter is already running arbiter_reload_config command", True),
    ("arbiter is restarting...", True),
    ("command '...': 'vm' already exist", True),
])
def test_stop_intent_reads_what_circusd_is_doing(reason: str, keep: bool) -> None:
    intent = interpret({"status": "error", "reason": reason})
    assert intent.keep_vm is keep, intent.why


def test_stop_intent_without_an_answer_shuts_down() -> None:
    assert interpret(None).keep_vm is False


# -- issue 20: liveness and adoption ------------------------------------------------------------


def test_a_hypervisor_that_stops_answering_is_failed_and_booted_at_the_next_wake(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGSTOPped QEMU was shown `running` for minutes. Now two unanswered status queries,
    each with its own deadline, make it `failed` with the reason; the next wake boots cold
    at once (no backoff: the VM ran)."""
    monkeypatch.setattr(vm, "LIVENESS_INTERVAL", 0.01)
    monkeypatch.setattr(vm, "LIVENESS_TIMEOUT", 0.05)

    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        backend.frozen = True
        assert await worker.wait_for(("failed",), 5)
        assert "stopped answering" in (worker.reason or "")
        assert "no answer within 0.05s" in (worker.reason or "")
        assert backend.calls[-1] == "kill"
        backend.frozen = False
        await booted(worker)
        assert worker.boots == 2

    run(t, config)


@pytest.mark.parametrize("process_stopped, misses", [(True, 1), (False, vm.LIVENESS_MISSES)])
def test_a_stopped_hypervisor_process_is_failed_at_its_first_miss(
        config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        process_stopped: bool, misses: int) -> None:
    """One unanswered query is enough when the process is stopped (it answers nothing until
    continued); a hung one gets its second chance. Read from the backend, not its message."""
    monkeypatch.setattr(vm, "LIVENESS_INTERVAL", 0.01)
    monkeypatch.setattr(vm, "LIVENESS_TIMEOUT", 0.05)

    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        backend.frozen, backend.process_stopped = True, process_stopped
        assert await worker.wait_for(("failed",), 5)

    run(t, config)
    assert caplog.text.count("the hypervisor did not answer") == misses


def test_an_adopted_save_under_way_is_finished_not_killed(config: Config) -> None:
    """kill -9 of the vm worker while `suspending` lost the VM: the new worker killed the
    saving QEMU and deleted the partial snapshot."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        path = worker.snapshots.begin()
        with open(path, "wb") as f:
            f.write(b"machine state")
        backend.adoptable, backend.save_found = "running", "saving"
        await worker.adopt()
        assert worker.state == "suspending"
        assert await worker.wait_for(("suspended",), 5)
        assert worker.snapshots.present() and "kill" not in backend.calls
        assert backend.calls == ["finish_suspend"]

    run(t, config)


def test_a_save_its_worker_did_not_record_is_kept(config: Config) -> None:
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        path = worker.snapshots.begin()
        with open(path, "wb") as f:
            f.write(b"machine state")
        await worker.adopt()  # the hypervisor is gone: it quit after its save completed
        assert worker.state == "suspended" and worker.snapshots.present()

    run(t, config)


def test_an_adopted_running_guest_is_proven_before_it_is_running(config: Config) -> None:
    """kill -9 of the vm worker while `starting`: the new worker published `running` for a
    half-booted guest without the SSH proof or the clock."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        backend.adoptable = "running"
        backend.announce.clear()  # still booting
        await worker.adopt()
        assert worker.state == "starting"
        waiting = asyncio.create_task(worker.handle("wake", {"wait": 5}))
        await backend.awaiting_announce.wait()
        assert worker.woken_at > 0 and not waiting.done()  # the wake came in, and waits
        backend.announce.set()
        ok, _err, st = await waiting
        assert ok and st["state"] == "running"
        assert "sync_guest" in backend.calls and "boot" not in backend.calls

    run(t, config)


def test_an_edited_config_waits_for_the_next_boot(config: Config, tmp_path: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json as json_

    src = tmp_path / "c.json"
    src.write_text(config.to_json())
    monkeypatch.setenv("VIRBY_CONFIG_SOURCE", str(src))
    monkeypatch.setattr(vm, "make_backend", lambda c, k: FakeBackend(c, k))

    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        src.write_text(json_.dumps({**json_.loads(config.to_json()), "memory": 768}))
        worker.reload()
        assert worker.config.memory == 768 and worker.pending == ["memory: 512 -> 768"]
        assert worker.snapshot()["config"]["pending"] == ["memory: 512 -> 768"]
        await worker.handle("stop", {"cold": True})
        assert worker.pending == []
        await booted(worker)
        assert worker.backend.config.memory == 768 and worker.pending == []

    run(t, config)


def test_a_guest_the_previous_worker_proved_is_adopted_as_running(config: Config) -> None:
    """Only a hypervisor the previous worker never saw `running` is proven again: a kill -9 of
    the vm worker under load must not hold clients for an SSH login."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)  # records the proven hypervisor
        keys = ensure_keys(config.stateDir)
        fresh = FakeBackend(config, keys)
        fresh.adoptable = "running"
        successor = vm.VMWorker(config, fresh, keys, FakeNode())  # type: ignore[arg-type]
        fresh.announce.clear()  # would hold a proof forever
        await successor.adopt()
        assert successor.state == "running" and "sync_guest" not in fresh.calls

    run(t, config)


# -- the transitions table and what is published ------------------------------------------------


def test_the_transitions_table_names_only_states() -> None:
    assert set(protocol.TRANSITIONS) == set(protocol.VM_STATES)
    assert all(after in protocol.VM_STATES for nxt in protocol.TRANSITIONS.values() for after in nxt)
    assert protocol.legal(protocol.RUNNING, protocol.PAUSED)
    assert protocol.legal(protocol.FAILED, protocol.FAILED)  # a new reason
    assert not protocol.legal(protocol.STOPPED, protocol.RUNNING)  # never without a boot
    assert not protocol.legal(protocol.SUSPENDED, protocol.RUNNING)  # never without a restore


def test_an_illegal_transition_is_logged_and_still_taken(config: Config,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Refusing it could leave the user's VM stuck in a state that is no longer true."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        worker._set(protocol.RUNNING)  # a bug: stopped -> running without a boot
        assert worker.state == "running"
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == ["illegal VM state transition stopped -> running"]
        caplog.clear()  # (for the autouse check: this one was on purpose)

    run(t, config)


def test_a_wake_of_a_running_vm_is_published_at_once(config: Config) -> None:
    """The idle monitor counts idle time from woken_at: it must not wait for a heartbeat."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        await booted(worker)
        node = worker.node
        assert isinstance(node, FakeNode)
        before = len(node.sent)
        await worker.handle("wake", {"wait": 0})
        assert len(node.sent) == before + 1
        assert node.sent[-1]["state"] == "running" and node.sent[-1]["woken_at"] == worker.woken_at

    run(t, config)


def test_the_boot_phase_is_published_while_starting(config: Config) -> None:
    """`virby start` words its progress from `phase`: a restore, else a cold boot."""
    async def t(worker: vm.VMWorker, backend: FakeBackend) -> None:
        node = worker.node
        assert isinstance(node, FakeNode)
        path = worker.snapshots.begin()
        with open(path, "wb") as f:
            f.write(b"machine state")
        await worker.adopt()  # a saved VM: the next wake restores it
        await booted(worker)  # (this fake cannot restore: a cold boot follows in the same wake)
        phases = [s["phase"] for s in node.sent if s["state"] == "starting"]
        assert phases[0] == "restoring" and phases[-1] == "booting"
        assert all(s["phase"] is None for s in node.sent if s["state"] != "starting")

    run(t, config)
