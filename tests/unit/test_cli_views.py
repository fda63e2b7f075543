"""The pure parts of the operator commands: the status table, the event diff, the light
state decoder (against the bus's own encoder) and the progress line."""

from __future__ import annotations

import io

import pytest

from virby.supervisor import control, events, progress, statusview
from virby.workers import bus

NOW = 1_800_000_000.0


def _vm(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "state": "stopped", "since": NOW - 65, "reason": None, "backend": "qemu", "pid": None, "boots": 0,
        "last_boot_seconds": None, "connections": 0, "inc": "10-1.0",
        "forwarder": {"accepted": 0, "open": 0, "failed": 0, "waiting": 0},
        "peers": {"forwarder": {"inc": "11-1.0", "up": True, "restarts": 0},
                  "idle": {"inc": "12-1.0", "up": True, "restarts": 0}},
    }
    base.update(kw)
    return base


def test_duration_and_size() -> None:
    assert [statusview.duration(x) for x in (None, 0, 59.6, 65, 3600 * 2 + 600, 86400 * 3 + 7200)] == \
        ["-", "0s", "1m00s", "1m05s", "2h10m", "3d02h"]
    assert statusview.size(512) == "512 B" and statusview.size(3 * 1024 * 1024) == "3.0 MiB"


def test_status_table_has_every_field() -> None:
    st = {
        "time": NOW,
        "vm": _vm(state="running", boots=2, last_boot_seconds=7.25, connections=1,
                  forwarder={"accepted": 5, "open": 1, "failed": 1, "waiting": 0}),
        "idle": {"decision": "1 connection(s) open"},
        "countdown": {"pause_in": 59.0, "stop_in": 599.0},
        "hypervisor": {"pid": 99, "rss": 300 * 1024 * 1024, "cpu_seconds": 12.5, "cpu_percent_avg": 4.2,
                       "age": 300},
        "watchers": {"vm": {"status": "active", "incarnation": "10-1.0", "restarts": 1, "uptime": 30,
                            "failure": {"count": 2, "reason": "OSError: x", "time": NOW - 10}}},
    }
    text = statusview.format_status(st)
    assert "running since " in text and "(1m05s ago)" in text
    assert "boots 2    last cold start 7.2s" in text
    assert "connections 1 open (5 accepted, 1 closed unserved)" in text
    assert "idle        1 connection(s) open (pause in 59s, stop in 9m59s)" in text
    assert "hypervisor  pid 99    RSS 300.0 MiB    CPU 4.2% avg (12.5s in 5m00s)" in text
    assert "vm         active    30s      1         10-1.0" in text
    assert "crashed 2x, last 10s ago: OSError: x" in text


def test_decode_state_reads_what_the_bus_sends() -> None:
    msg = bus.Message("state", "vm", "1-2.0", 7, NOW, {"state": "running"})
    got = control.decode_state(msg.encode())
    assert got == bus.Message("state", "vm", "1-2.0", 7, NOW, {"state": "running"})
    event = bus.Message("event", "idle", "1-2.0", 1, NOW, {"event": "x"})
    assert control.decode_state(event.encode()) is None
    assert control.decode_state([b"vm", b"{not json"]) is None
    assert control.decode_state([b"idle", msg.encode()[1]]) is None  # topic and sender disagree
    assert control.decode_state([b"vm"]) is None


def test_events_diff_vm_transitions_and_connections() -> None:
    a = _vm()
    b = _vm(state="starting", forwarder={"accepted": 2, "open": 2, "failed": 0, "waiting": 2}, connections=2)
    evs = events.diff("vm", a, b, NOW)
    assert [e.text for e in evs] == ["stopped -> starting", "connections: 2 accepted; 2 open"]
    c = _vm(state="running", boots=1, last_boot_seconds=9.5, connections=1,
            forwarder={"accepted": 2, "open": 1, "failed": 0, "waiting": 0})
    assert [e.text for e in events.diff("vm", b, c, NOW)] == [
        "starting -> running (boot 1, ready in 9.5s)", "connections: 1 closed; 1 open"]
    assert events.diff("vm", c, dict(c), NOW) == []  # a heartbeat: nothing


def test_events_diff_failed_clients_and_restarts() -> None:
    a = _vm(state="starting")
    b = _vm(state="failed", reason="no kernel", inc="20-2.0",
            forwarder={"accepted": 1, "open": 0, "failed": 1, "waiting": 0},
            peers={"forwarder": {"inc": "13-3.0", "up": True}, "idle": {"inc": "12-1.0", "up": True}})
    texts = [e.text for e in events.diff("vm", a, b, NOW)]
    assert texts[0] == "vm worker restarted (incarnation 10-1.0 -> 20-2.0)"
    assert "starting -> failed (no kernel)" in texts
    assert "forwarder restarted (incarnation 11-1.0 -> 13-3.0)" in texts
    # counters of a new forwarder are not compared with the old one's
    assert not any("accepted" in t or "closed before" in t for t in texts)


def test_events_diff_idle_ignores_the_ticking_countdown() -> None:
    a = {"inc": "1-1", "decision_code": "counting-down", "decision": "idle; next step in 598s",
         "vm": "running", "pause_at": NOW + 598, "stop_at": NOW + 1198}
    b = {**a, "decision": "idle; next step in 597s"}
    assert events.diff("idle", a, b, NOW) == []
    c = {**a, "decision_code": "busy", "decision": "1 connection(s) open", "pause_at": None, "stop_at": None}
    (ev,) = events.diff("idle", b, c, NOW)
    assert ev.kind == "decision" and ev.text == "1 connection(s) open"
    # the decision is told by its code, not its words: more connections are no new decision
    assert events.diff("idle", c, {**c, "decision": "2 connection(s) open"}, NOW) == []
    e = {**a, "decision_code": "vm-not-up", "decision": "nothing to do (VM stopped)", "vm": "stopped",
         "pause_at": None, "stop_at": None}
    f = {**e, "decision": "nothing to do (VM suspended)", "vm": "suspended"}
    assert [ev.text for ev in events.diff("idle", e, f, NOW)] == ["nothing to do (VM suspended)"]
    d = {**a, "pause_at": NOW + 900}  # new activity moved the deadline
    assert [e.kind for e in events.diff("idle", a, d, NOW)] == ["decision"]


def test_event_line_and_json() -> None:
    ev = events.Event(NOW + 0.25, "vm", "state", "stopped -> starting", {"state": "starting"})
    assert ev.line().endswith(".250 vm        stopped -> starting")
    assert '"state": "starting"' in ev.json() and '"owner": "vm"' in ev.json()


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def test_progress_plain_prints_changes_only() -> None:
    s = _Stream(tty=False)
    p = progress.Progress(s)
    for _ in range(5):
        p.update("booting the VM (cold start)")
    p.update("resuming the VM")
    p.done()
    assert s.getvalue().splitlines() == ["virby: booting the VM (cold start) (0s)",
                                         "virby: resuming the VM (0s)"]


def test_progress_on_a_terminal_redraws_one_line() -> None:
    s = _Stream(tty=True)
    p = progress.Progress(s)
    p.update("booting the VM (cold start)")
    p.update("booting the VM (cold start)")
    p.done()
    out = s.getvalue()
    assert out.count("\r\033[K") == 3 and "\n" not in out
    assert "⠙ booting the VM (cold start) 0.0s" in out


@pytest.mark.parametrize(("state", "words"), [
    ({"state": "starting", "phase": "restoring", "reason": "whatever the worker wrote"},
     "restoring the saved VM"),
    ({"state": "starting", "phase": "booting", "reason": "restoring is not what it does"},
     "booting the VM (cold start)"),
    ({"state": "starting", "phase": "proving"}, "checking the running VM before use"),
    ({"state": "suspended", "phase": None}, "asking the VM to restore"),
])
def test_start_progress_is_worded_from_the_phase_not_the_reason(state: dict, words: str) -> None:
    assert progress._words(state) == words  # type: ignore[arg-type]
