"""The CLI's side of the conversation with a running Virby: circusd's control socket for the
watchers, the bus for the VM. Every call is bounded by a short timeout and raises NotRunning
with one clear line when the arbiter is not there."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from virby.supervisor.config import Config
from virby.workers import bus
from virby.workers.runtime import read_failure

WATCHERS = ("vm", "forwarder", "idle")


class NotRunning(Exception):
    """No arbiter answers for this config."""


def _ipc_file(endpoint: str) -> str:
    return endpoint.removeprefix("ipc://")


def circus_call(config: Config, command: str, timeout: float = 1.0, **props: Any) -> dict[str, Any]:
    """One command to circusd's control socket (the same JSON `circusctl` sends)."""
    from circus.client import CircusClient
    from circus.exc import CallError

    endpoint = config.endpoint("ctl")
    if not os.path.exists(_ipc_file(endpoint)):
        raise NotRunning(f"virby is not running: no arbiter at {endpoint} "
                         "(start it with `virby run`)")
    client = CircusClient(endpoint=endpoint, timeout=timeout)
    try:
        reply = client.call({"command": command, "properties": props})
    except CallError as e:
        raise NotRunning(f"virby is not running: the arbiter at {endpoint} does not answer ({e})") from e
    finally:
        client.stop()
    if not isinstance(reply, dict):
        raise NotRunning(f"unexpected reply from circusd: {reply!r}")
    return reply


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
    if not os.path.exists(_ipc_file(config.endpoint("ctl"))):
        raise NotRunning(f"virby is not running: no arbiter at {config.endpoint('ctl')} "
                         "(start it with `virby run`)")
    try:
        return asyncio.run(bus.request(config, cmd, args, timeout=timeout, ctx=zmq.asyncio.Context()))
    except bus.RequestError as e:
        raise NotRunning(f"the vm worker does not answer: {e}") from e


async def _collect_states(config: Config, timeout: float) -> dict[str, bus.Message]:
    """Subscribe to the state owners' XPUBs: each replays its state on subscription."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    got: dict[str, bus.Message] = {}
    try:
        for owner in bus.XPUB_OWNERS:
            sock.setsockopt(zmq.SUBSCRIBE, owner.encode())
            sock.connect(config.endpoint(f"{owner}.pub"))
        deadline = time.monotonic() + timeout
        while len(got) < len(bus.XPUB_OWNERS):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await sock.poll(remaining * 1000):
                break
            try:
                msg = bus.decode(await sock.recv_multipart())
            except bus.BadMessage:
                continue
            if msg.kind == "state":
                got[msg.sender] = msg
    finally:
        sock.close(linger=0)
        ctx.term()
    return got


def status(config: Config, timeout: float = 0.5) -> dict[str, Any]:
    """Everything `virby status` shows, as one JSON-able dict."""
    watchers = watcher_status(config)
    states = asyncio.run(_collect_states(config, timeout))
    vm = states.get("vm")
    idle = states.get("idle")
    out: dict[str, Any] = {"watchers": watchers}
    out["vm"] = vm.data if vm else {"state": "unknown", "reason": "the vm worker does not answer"}
    out["idle"] = idle.data if idle else None
    peers = vm.data.get("peers", {}) if vm else {}
    out["incarnations"] = {
        "vm": vm.inc if vm else None,
        "idle": idle.inc if idle else (peers.get("idle") or {}).get("inc"),
        "forwarder": (peers.get("forwarder") or {}).get("inc"),
    }
    for name in WATCHERS:
        watchers[name]["incarnation"] = out["incarnations"][name]
    out["connections"] = out["vm"].get("connections")
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
