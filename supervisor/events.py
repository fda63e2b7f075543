"""`virby events`: the bus as it happens, one line per thing that changed.

The state owners (vm, idle) broadcast their whole state on every change and as a heartbeat
each second; this module diffs consecutive states of each owner and prints only what changed:
VM state transitions, connections accepted/closed (the forwarder's counters, relayed in the vm
worker's `forwarder` field), clients closed unserved, idle decisions, and restarts of any
worker (a new incarnation). The idle monitor's own events (pause/stop requests it made) are
printed as they come.

`diff()` is pure, so the wording is unit-tested without a bus.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virby.core import watchers
from virby.core.config import Config
from virby.core.protocol import (
    FAILED,
    RUNNING,
    XPUB_OWNERS,
    BadMessage,
    ForwarderStateData,
    as_idle_state,
    as_vm_state,
    decode,
)
from virby.supervisor import control

SILENT_AFTER = 3.5  # three missed heartbeats, as the workers judge each other (bus.PEER_TIMEOUT)


@dataclass(frozen=True)
class Event:
    t: float
    owner: str  # vm, idle, forwarder
    kind: str  # snapshot, state, connections, decision, restart, request, silent
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.t)) + f".{int(self.t % 1 * 1000):03d}"
        return f"{stamp} {self.owner:<9} {self.text}"

    def json(self) -> str:
        return json.dumps({"t": self.t, "owner": self.owner, "kind": self.kind, "text": self.text,
                           **self.data}, sort_keys=True, default=str)


def _num(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _peer_inc(state: dict[str, Any], name: str) -> str | None:
    p = (state.get("peers") or {}).get(name) or {}
    return p.get("inc") if isinstance(p, dict) and p.get("up") else None


def _when(at: Any, now: float) -> str | None:
    if not isinstance(at, int | float):
        return None
    return f"{max(0.0, at - now):.0f}s"


def snapshot(owner: str, data: dict[str, Any], t: float) -> Event:
    if owner == "vm":
        state = as_vm_state(data)
        fwd: ForwarderStateData = state.get("forwarder") or {}
        text = (f"{state.get('state')}"
                + (f" ({state['reason']})" if state.get("reason") else "")
                + f"; boots {state.get('boots')}; {state.get('connections')} connection(s) open"
                + (f", {fwd['accepted']} accepted so far" if isinstance(fwd.get("accepted"), int) else ""))
        return Event(t, "vm", "snapshot", text, {"state": state.get("state"), "boots": state.get("boots"),
                                                 "connections": state.get("connections")})
    idle = as_idle_state(data)
    steps = [f"{name} in {w}" for name, w in (("pause", _when(idle.get("pause_at"), t)),
                                               ("stop", _when(idle.get("stop_at"), t))) if w]
    text = f"{idle.get('decision')}" + (f" ({', '.join(steps)})" if steps else "")
    return Event(t, "idle", "snapshot", text, {"decision": idle.get("decision"),
                                               "pause_at": idle.get("pause_at"),
                                               "stop_at": idle.get("stop_at")})


def diff(owner: str, prev: dict[str, Any], cur: dict[str, Any], t: float) -> list[Event]:
    """What changed between two consecutive states of one owner (each with its `inc`)."""
    out: list[Event] = []
    if prev.get("inc") != cur.get("inc"):
        who = watchers.BY_NAME[owner].label
        out.append(Event(t, owner, "restart", f"{who} restarted (incarnation {prev.get('inc')} -> "
                                              f"{cur.get('inc')})", {"inc": cur.get("inc")}))
    if owner == "vm":
        out += _diff_vm(prev, cur, t)
    else:
        out += _diff_idle(prev, cur, t)
    return out


def _diff_vm(prev_data: dict[str, Any], cur_data: dict[str, Any], t: float) -> list[Event]:
    out: list[Event] = []
    prev, cur = as_vm_state(prev_data), as_vm_state(cur_data)
    before, after = prev.get("state"), cur.get("state")
    if before != after or (after == FAILED and prev.get("reason") != cur.get("reason")):
        text = f"{before} -> {after}"
        if after == RUNNING and _num(cur.get("boots")) > _num(prev.get("boots")):
            text += f" (boot {cur.get('boots')}, ready in {cur.get('last_boot_seconds')}s)"
        elif cur.get("reason"):
            text += f" ({cur['reason']})"
        out.append(Event(t, "vm", "state", text, {"from": before, "state": after, "reason": cur.get("reason"),
                                                  "boots": cur.get("boots")}))
    pf: ForwarderStateData = prev.get("forwarder") or {}
    cf: ForwarderStateData = cur.get("forwarder") or {}
    fwd_inc_before, fwd_inc_after = _peer_inc(prev_data, "forwarder"), _peer_inc(cur_data, "forwarder")
    if fwd_inc_before and fwd_inc_after and fwd_inc_before != fwd_inc_after:
        out.append(Event(t, "forwarder", "restart",
                         f"forwarder restarted (incarnation {fwd_inc_before} -> {fwd_inc_after})",
                         {"inc": fwd_inc_after}))
    elif fwd_inc_before and not fwd_inc_after:
        out.append(Event(t, "forwarder", "silent", "forwarder went silent (no heartbeat for 3s)"))
    same_forwarder = fwd_inc_before == fwd_inc_after
    accepted = _num(cf.get("accepted")) - _num(pf.get("accepted")) if same_forwarder else 0
    failed = _num(cf.get("failed")) - _num(pf.get("failed")) if same_forwarder else 0
    open_before, open_after = _num(prev.get("connections")), _num(cur.get("connections"))
    if accepted > 0 or open_before != open_after:
        parts = []
        if accepted > 0:
            parts.append(f"{accepted} accepted")
        closed = open_before + max(0, accepted) - open_after
        if closed > 0:
            parts.append(f"{closed} closed")
        out.append(Event(t, "forwarder", "connections",
                         f"connections: {', '.join(parts) or 'changed'}; {open_after} open",
                         {"accepted": max(0, accepted), "closed": max(0, closed), "open": open_after,
                          "waiting": cf.get("waiting")}))
    if failed > 0:
        out.append(Event(t, "forwarder", "unserved",
                         f"{failed} client(s) closed before the VM was ready (`virby logs forwarder` "
                         "says why)", {"failed": failed}))
    return out


def _moved(before: float | None, after: float | None) -> bool:
    """A countdown appeared, went, or was re-planned (more than its own ticking)."""
    if before is None or after is None:
        return (before is None) != (after is None)
    return abs(after - before) > 1.5


def _diff_idle(prev_data: dict[str, Any], cur_data: dict[str, Any], t: float) -> list[Event]:
    prev, cur = as_idle_state(prev_data), as_idle_state(cur_data)
    moved = (_moved(prev.get("pause_at"), cur.get("pause_at"))
             or _moved(prev.get("stop_at"), cur.get("stop_at")))
    # The decision's text ticks with the countdown; its code and the VM state it rests on do not.
    if (prev.get("decision_code"), prev.get("vm")) == (cur.get("decision_code"), cur.get("vm")) \
            and not moved:
        return []
    ev = snapshot("idle", cur_data, t)
    return [Event(t, "idle", "decision", ev.text, ev.data)]


def _request_event(msg: Any) -> Event:
    data = dict(msg.data)
    name = data.pop("event", "?")
    since = data.get("idle_since")
    when = (f" (idle since {time.strftime('%H:%M:%S', time.localtime(since))})"
            if isinstance(since, int | float) else "")
    return Event(msg.t, msg.sender, "request", f"asked the vm worker to {name}{when}",
                 {"event": name, **data})


def current(config: Config, timeout: float = 1.0) -> list[Event]:
    states = control.collect_states(config, timeout)
    now = time.time()
    out = []
    for owner in XPUB_OWNERS:
        msg = states.get(owner)
        if msg is None:
            out.append(Event(now, owner, "silent", "no answer (is the worker running? `virby status`)"))
        else:
            out.append(snapshot(owner, {**msg.data, "inc": msg.inc}, now))
    return out


def follow(config: Config, emit: Callable[[Event], None], *,
           stop: Callable[[], bool] = lambda: False) -> None:
    """Print the current state of each owner, then every change, until `stop()` or Ctrl-C."""
    sock = control.subscribe(config)
    last: dict[str, dict[str, Any]] = {}
    heard: dict[str, float] = {}
    silent: set[str] = set()
    try:
        while not stop():
            if sock.poll(500):
                try:
                    msg = decode(sock.recv_multipart())
                except BadMessage:
                    continue
                heard[msg.sender] = time.monotonic()
                silent.discard(msg.sender)
                if msg.kind == "event":
                    emit(_request_event(msg))
                    continue
                cur = {**msg.data, "inc": msg.inc}
                prev = last.get(msg.sender)
                if prev is None:
                    emit(snapshot(msg.sender, cur, msg.t))
                else:
                    for ev in diff(msg.sender, prev, cur, msg.t):
                        emit(ev)
                last[msg.sender] = cur
            now = time.monotonic()
            for owner, at in heard.items():
                if owner not in silent and now - at > SILENT_AFTER:
                    silent.add(owner)
                    emit(Event(time.time(), owner, "silent",
                               f"no heartbeat for {SILENT_AFTER:g}s (worker down or restarting)"))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
