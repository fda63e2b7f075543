"""The idle monitor: decides when the VM is paused and when it is stopped.

With no connection open, it asks the vm worker to pause `onDemand.pauseAfter` seconds after the
last activity and to stop it `onDemand.stopAfter` seconds after it (memory goes back to the
host). Either stage can be disabled (null). The requests carry the idle start they are based on,
so the vm worker refuses them if a client came in meanwhile; it also refuses while any forwarder
reports an open connection. With `onDemand.enable = false` this process only reports.

It holds no state that matters: killed and restarted, it recomputes everything from the vm
worker's and the forwarders' next broadcasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from virby.core.config import Config
from virby.core.protocol import PAUSED, RUNNING, UNKNOWN, IdleStateData, as_vm_state
from virby.workers import bus, reconfig, runtime
from virby.workers.activity import Activity
from virby.workers.runtime import run_worker

log = logging.getLogger("virby.idle")

RETRY = 1.0  # after a refused or failed request


class IdleMonitor:
    def __init__(self, config: Config, node: bus.Node) -> None:
        self.config = config
        self.node = node
        self.activity = Activity()
        self.changed = asyncio.Event()
        self.info: IdleStateData = {"decision": "waiting for the vm worker"}
        self.not_before = 0.0  # monotonic: back off after a refusal
        self.started = time.time()
        node.use_state(lambda: dict(self.info))

    async def on_message(self, msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        self.activity.observe(msg)
        self.changed.set()

    def reload(self) -> None:
        """SIGHUP: the idle policy (onDemand.*) is taken from the file at once."""
        result = reconfig.reread(self.config)
        reconfig.report(result, "idle")
        self.config = result.config
        self.changed.set()

    def plan(self) -> tuple[str | None, float | None, IdleStateData]:
        """(action due now or None, seconds until the next deadline, broadcast state)."""
        od = self.config.onDemand
        vm = self.node.peers["vm"]
        vm_view = as_vm_state(vm.state)
        vm_state = vm_view.get("state") if vm.up else None
        open_ = self.activity.open_connections()
        idle_since = max(self.activity.last_activity(), vm_view.get("woken_at", 0.0))
        if not self.activity.heard_any():
            # No forwarder heard yet (`circusctl restart` restarts all three, and the vm worker
            # forgets its woken_at): count the idle time from our own start, never from 1970.
            idle_since = max(idle_since, self.started)
        info: IdleStateData = {"enabled": od.enable, "vm": vm_state, "connections": open_,
                               "idle_since": idle_since, "pause_at": None, "stop_at": None}
        if not od.enable:
            return None, None, {**info, "decision_code": "off",
                                "decision": "on-demand is off: the VM stays up"}
        if vm_state not in (RUNNING, PAUSED):
            return None, None, {**info, "decision_code": "vm-not-up",
                                "decision": f"nothing to do (VM {vm_state or UNKNOWN})"}
        if open_ > 0:
            return None, None, {**info, "decision_code": "busy",
                                "decision": f"{open_} connection(s) open"}
        now = time.time()
        pause_at = idle_since + od.pauseAfter if od.pauseAfter is not None else None
        stop_at = idle_since + od.stopAfter if od.stopAfter is not None else None
        info.update({"pause_at": pause_at if vm_state == RUNNING else None, "stop_at": stop_at})
        if stop_at is not None and now >= stop_at:
            return "stop", None, {**info, "decision_code": "stop-due",
                                  "decision": "asking the vm worker to stop the VM"}
        if vm_state == RUNNING and pause_at is not None and now >= pause_at:
            return "pause", None, {**info, "decision_code": "pause-due",
                                   "decision": "asking the vm worker to pause the VM"}
        deadlines = [t for t in (info["pause_at"], stop_at) if t is not None]
        if not deadlines:
            return None, None, {**info, "decision_code": "no-stage", "decision": "idle, no stage enabled"}
        nxt = min(deadlines)
        return None, max(0.0, nxt - now), {**info, "decision_code": "counting-down",
                                           "decision": f"idle; next step in {nxt - now:.0f}s"}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            action, wait, info = self.plan()
            self.info = info
            self.node.changed()  # the plan's news goes out at once, the countdown's text with heartbeats
            if action is not None and time.monotonic() >= self.not_before:
                await self._ask(action, info["idle_since"])
                continue
            if action is not None:
                wait = max(0.0, self.not_before - time.monotonic())
            self.changed.clear()
            # Wake on any bus message, the next deadline, or a heartbeat's worth of time.
            timeout = bus.HEARTBEAT if wait is None else min(wait + 0.01, bus.HEARTBEAT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)

    async def _ask(self, action: str, idle_since: float) -> None:
        log.info("idle since %s: asking the vm worker to %s",
                 time.strftime("%H:%M:%S", time.localtime(idle_since)), action)
        try:
            reply = await bus.request(self.config, action, {"if_idle": True, "idle_since": idle_since},
                                      timeout=60 if action == "stop" else 10,
                                      peer=self.node.peers["vm"])
        except bus.RequestError as e:
            log.warning("%s not done: %s", action, e)
            self.not_before = time.monotonic() + RETRY
            return
        if not reply["ok"]:
            log.info("%s refused: %s", action, reply.get("error"))
            self.not_before = time.monotonic() + RETRY
        else:
            self.node.event(action, idle_since=idle_since)
        # The vm worker's reply carries its new state; use it rather than wait a heartbeat.
        state = reply.get("state")
        if isinstance(state, dict):
            self.node.peers["vm"].state = state


async def main(config: Config, stop: asyncio.Event) -> None:
    monitor: IdleMonitor | None = None

    async def on_message(msg: bus.Message, peer: bus.Peer, restarted: bool) -> None:
        if monitor is not None:
            await monitor.on_message(msg, peer, restarted)

    node = bus.Node("idle", config, on_message, volatile=("decision",))
    monitor = IdleMonitor(config, node)
    runtime.on_sighup(monitor.reload)
    await node.start()
    log.info("idle monitor ready (incarnation %s)", node.inc)
    await monitor.run(stop)
    await node.close()


if __name__ == "__main__":
    run_worker("idle", main)
