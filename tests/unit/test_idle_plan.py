"""The idle monitor's decisions and the activity counts they rest on, from bus messages."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from virby.core.config import Config, from_dict
from virby.workers import bus
from virby.workers.activity import Activity
from virby.workers.idle import IdleMonitor


def fwd_state(inc: str, open_: int, last: float, seq: int = 1) -> bus.Message:
    return bus.Message("state", "forwarder", inc, seq, time.time(), {"open": open_, "last_activity": last})


def test_activity_sums_forwarders_and_forgets_silent_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    a = Activity()
    now = time.time()
    a.observe(fwd_state("1-1", 2, now - 5))
    a.observe(fwd_state("2-2", 1, now - 1))  # a second forwarder during `reload forwarder`
    assert a.open_connections() == 3 and a.forwarders() == 2
    assert a.last_activity() == pytest.approx(now - 1)
    # forwarder 1 goes silent for longer than three heartbeats: its connections died with it
    later = time.monotonic() + bus.PEER_TIMEOUT + 1
    a.observe(fwd_state("2-2", 0, now, seq=2))
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert a.open_connections() == 0 and a.forwarders() == 0
    assert a.last_activity() >= now - 1


def test_activity_ignores_other_senders_and_bad_fields() -> None:
    a = Activity()
    a.observe(bus.Message("state", "vm", "1-1", 1, 1.0, {"open": 9, "last_activity": 1.0}))
    a.observe(bus.Message("state", "forwarder", "1-1", 1, 1.0, {"open": "many", "last_activity": 1.0}))
    assert a.open_connections() == 0


@pytest.fixture
def config() -> Iterator[Config]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        yield from_dict({"runtimeDir": d, "stateDir": d, "onDemand": {"pauseAfter": 10, "stopAfter": 30}})


def monitor(config: Config, vm_state: dict[str, Any] | None, *, open_: int = 0,
            last: float | None = None, forwarder: bool = True) -> IdleMonitor:
    node = bus.Node("idle", config)  # no sockets are opened until start()
    m = IdleMonitor(config, node)
    if vm_state is not None:
        peer = node.peers["vm"]
        peer.inc, peer.last_seen, peer.state = "1-1", time.monotonic(), vm_state
    if forwarder:
        m.activity.observe(fwd_state("5-5", open_, last if last is not None else time.time()))
    return m


def test_restart_all_does_not_suspend_the_adopted_vm_at_once(config: Config) -> None:
    """`circusctl restart`: the new vm worker adopts the running VM with woken_at 0, and the new
    idle monitor hears it before any forwarder. It counts the idle time from its own start."""
    before = time.time()
    m = monitor(config, {"state": "running", "woken_at": 0.0}, forwarder=False)
    action, wait, info = m.plan()
    after = time.time()
    assert action is None, info
    # bracketed by the test's own clock readings, not compared with a tolerance
    assert info["idle_since"] == m.started and before <= m.started <= after
    assert wait is not None and 10 - (after - before) <= wait <= 10  # pauseAfter from its start, not 1970
    # once a forwarder reports, its own last activity counts
    m.activity.observe(fwd_state("6-6", 0, time.time() - 100))
    action, _, _ = m.plan()
    assert action == "stop"


def test_nothing_to_do_without_a_vm_worker(config: Config) -> None:
    action, wait, info = monitor(config, None).plan()
    assert action is None and wait is None and "unknown" in info["decision"]
    assert info["decision_code"] == "vm-not-up"


def test_counts_down_to_pause_then_pauses(config: Config) -> None:
    now = time.time()
    action, wait, info = monitor(config, {"state": "running", "woken_at": now - 4}, last=now - 4).plan()
    assert action is None and wait == pytest.approx(6, abs=0.5)
    assert info["pause_at"] == pytest.approx(now + 6, abs=0.5)
    assert info["stop_at"] == pytest.approx(now + 26, abs=0.5)
    assert info["decision_code"] == "counting-down"
    action, _, info = monitor(config, {"state": "running", "woken_at": 0}, last=now - 11).plan()
    assert action == "pause" and info["decision_code"] == "pause-due"


def test_stops_a_paused_vm_after_stop_after(config: Config) -> None:
    now = time.time()
    action, wait, _ = monitor(config, {"state": "paused", "woken_at": 0}, last=now - 20).plan()
    assert action is None and wait == pytest.approx(10, abs=0.5)
    action, _, info = monitor(config, {"state": "paused", "woken_at": 0}, last=now - 31).plan()
    assert action == "stop" and info["decision_code"] == "stop-due"
    assert info["decision"] == "asking the vm worker to stop the VM"


def test_never_while_a_connection_is_open(config: Config) -> None:
    action, wait, info = monitor(config, {"state": "running"}, open_=1, last=time.time() - 3600).plan()
    assert action is None and wait is None and info["decision"] == "1 connection(s) open"
    assert info["decision_code"] == "busy"


def test_a_recent_wake_restarts_the_idle_period(config: Config) -> None:
    now = time.time()
    action, wait, _ = monitor(config, {"state": "running", "woken_at": now - 1}, last=now - 3600).plan()
    assert action is None and wait == pytest.approx(9, abs=0.5)


def test_on_demand_off_means_always_on() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        c = from_dict({"runtimeDir": d, "stateDir": d, "onDemand": {"enable": False}})
        action, _, info = monitor(c, {"state": "running"}, last=0).plan()
        assert action is None and "stays up" in info["decision"] and info["decision_code"] == "off"


def test_disabled_stages() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        c = from_dict({"runtimeDir": d, "stateDir": d, "onDemand": {"pauseAfter": None, "stopAfter": 5}})
        action, _, _ = monitor(c, {"state": "running"}, last=time.time() - 6).plan()
        assert action == "stop"
        c = from_dict({"runtimeDir": d, "stateDir": d, "onDemand": {"pauseAfter": None, "stopAfter": None}})
        action, wait, info = monitor(c, {"state": "running"}, last=0).plan()
        assert action is None and wait is None and "no stage" in info["decision"]
        assert info["decision_code"] == "no-stage"
