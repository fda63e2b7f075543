"""The CLI's side of the conversation with a running Virby: circusd's control socket for the
watchers, the bus for the VM. Every call is bounded by a short timeout and raises NotRunning
with one clear line when the arbiter is not there.

`virby status` must answer in well under 100 ms, so this module is synchronous and light: it
speaks circusd's JSON protocol and the vm worker's commands through core/request.py's plain
DEALERs (circus.client pulls in tornado and, through zmq.ssh, paramiko: ~70 ms) and reads the
state owners' XPUB replays with a blocking SUB. The message formats and names come from core/protocol.py and
the crash records from core/failures.py, neither of which imports asyncio (~35 ms). The CLI
never imports the workers' bus (workers/bus.py): the protocol is the whole contract.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import zmq

from virby.core import request as client
from virby.core.config import Config
from virby.core.failures import read_failure
from virby.core.protocol import (
    CIRCUS_CONTROL,
    UNKNOWN,
    VM_COMMANDS,
    WATCHERS,
    XPUB_OWNERS,
    BadMessage,
    Message,
    decode,
    state_endpoint,
)


class NotRunning(Exception):
    """No arbiter answers for this config."""


def _ipc_file(endpoint: str) -> str:
    return endpoint.removeprefix("ipc://")


def require_running(config: Config) -> None:
    """The one answer to "is Virby running?" for every command: circusd's control socket is
    there. A stale one left by a killed circusd is caught by the call after, which times out
    with its own line."""
    endpoint = config.endpoint(CIRCUS_CONTROL)
    if not os.path.exists(_ipc_file(endpoint)):
        raise NotRunning(f"virby is not running: no arbiter at {endpoint} (start it with `virby run`)")


def circus_call(config: Config, command: str, timeout: float = 1.0, **props: Any) -> dict[str, Any]:
    """One command to circusd's control socket (the same JSON `circusctl` sends)."""
    require_running(config)
    endpoint = config.endpoint(CIRCUS_CONTROL)
    try:
        return client.circus(endpoint, command, props, timeout=timeout, silent=(
            f"virby is not running: the arbiter at {endpoint} does not answer within {timeout:g}s"))
    except client.NoAnswer as e:
        raise NotRunning(str(e)) from None


# A state broadcast as the bus sends it.
State = Message


def decode_state(frames: list[bytes]) -> State | None:
    """A valid state message from a state owner, or None (anything else is not for us)."""
    try:
        msg = decode(frames)
    except BadMessage:
        return None
    return msg if msg.kind == "state" else None


def watcher_status(config: Config) -> dict[str, dict[str, Any]]:
    reply = circus_call(config, "status")
    statuses = reply.get("statuses", {})
    out: dict[str, dict[str, Any]] = {}
    for name in WATCHERS:
        entry: dict[str, Any] = {"status": statuses.get(name, "missing")}
        failure = read_failure(config, name)
        if failure:
            entry["failure"] = failure
        out[name] = entry
    return out


def request(config: Config, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 2.0) -> dict[str, Any]:
    """One command to the vm worker and its reply (`{"ok", "error"?, "state"?}`)."""
    require_running(config)
    try:
        return client.command(config.endpoint(VM_COMMANDS), cmd, args, timeout=timeout, silent=(
            f"the vm worker does not answer: no answer from the vm worker within {timeout:g}s ({cmd})"))
    except client.NoAnswer as e:
        raise NotRunning(str(e)) from None


def subscribe(config: Config, ctx: zmq.Context[Any] | None = None) -> zmq.Socket[Any]:
    """A SUB on both state owners' XPUBs; each replays its state at once on subscription.
    The caller closes it."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    for owner in XPUB_OWNERS:
        sock.setsockopt(zmq.SUBSCRIBE, owner.encode())
        sock.connect(config.endpoint(state_endpoint(owner)))
    return sock


def collect_states(config: Config, timeout: float) -> dict[str, State]:
    """The latest state message of each owner, or fewer on timeout."""
    sock = subscribe(config)
    got: dict[str, State] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(got) < len(XPUB_OWNERS):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                break
            msg = decode_state(sock.recv_multipart())
            if msg is not None:
                got[msg.sender] = msg
    finally:
        sock.close(linger=0)
    return got


def _peer(view: dict[str, Any] | None, name: str) -> dict[str, Any]:
    peers = (view or {}).get("peers") or {}
    p = peers.get(name)
    return p if isinstance(p, dict) else {}


def _uptime(inc: str | None, now: float) -> float | None:
    """An incarnation is "<pid>-<create time>": its age needs no process lookup."""
    try:
        return round(now - float(str(inc).split("-", 1)[1]), 1)
    except (IndexError, ValueError):
        return None


def hypervisor_usage(pid: Any) -> dict[str, Any] | None:
    """RSS and CPU of the hypervisor process. CPU is the average since it started: a sample
    over the few milliseconds `status` runs would only show clock ticks."""
    if not isinstance(pid, int):
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            times = p.cpu_times()
            rss = p.memory_info().rss
            age = max(0.001, time.time() - p.create_time())
    except (psutil.Error, OSError):
        return None
    cpu = times.user + times.system
    return {"pid": pid, "rss": rss, "cpu_seconds": round(cpu, 2),
            "cpu_percent_avg": round(100.0 * cpu / age, 1), "age": round(age, 1)}


def status(config: Config, timeout: float = 0.5) -> dict[str, Any]:
    """Everything `virby status` shows, as one JSON-able dict.

    Keys kept stable for scripts: watchers.<name>.status/incarnation/failure, vm.*,
    incarnations.*, connections, idle. Added: watchers.<name>.restarts/uptime, hypervisor,
    countdown."""
    watchers = watcher_status(config)
    states = collect_states(config, timeout)
    now = time.time()
    vm = states.get("vm")
    idle = states.get("idle")
    out: dict[str, Any] = {"watchers": watchers}
    out["vm"] = vm.data if vm else {"state": UNKNOWN, "reason": "the vm worker does not answer"}
    out["idle"] = idle.data if idle else None
    vm_view = vm.data if vm else None
    idle_view = idle.data if idle else None
    fwd_view = (vm.data.get("forwarder") if vm else None) or None
    out["incarnations"] = {
        "vm": vm.inc if vm else _peer(idle_view, "vm").get("inc"),
        "idle": idle.inc if idle else _peer(vm_view, "idle").get("inc"),
        "forwarder": _peer(vm_view, "forwarder").get("inc") or _peer(idle_view, "forwarder").get("inc"),
    }
    # A process cannot count its own restarts; its peers do (since they started).
    observers = {"vm": (idle_view, fwd_view), "forwarder": (vm_view, idle_view),
                 "idle": (vm_view, fwd_view)}
    for name in WATCHERS:
        counts = [_peer(v, name).get("restarts") for v in observers[name]]
        watchers[name]["incarnation"] = out["incarnations"][name]
        watchers[name]["restarts"] = max([c for c in counts if isinstance(c, int)], default=None)
        watchers[name]["uptime"] = _uptime(out["incarnations"][name], now)
    out["connections"] = out["vm"].get("connections")
    out["hypervisor"] = hypervisor_usage(out["vm"].get("pid"))
    countdown: dict[str, float | None] = {"pause_in": None, "stop_in": None}
    if idle is not None:
        for key, field in (("pause_in", "pause_at"), ("stop_in", "stop_at")):
            at = idle.data.get(field)
            if isinstance(at, int | float):
                countdown[key] = round(max(0.0, at - now), 1)
    out["countdown"] = countdown
    out["time"] = now
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
