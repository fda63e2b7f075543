"""Why circusd sends the vm worker SIGTERM: is the arbiter going away, or is only our watcher
being restarted? The first ends the VM (nothing would adopt it); the second must leave it
running for the next vm worker to adopt (`circusctl restart vm` must not kill a build).

The signal is the same in both cases, and circus's events stream cannot tell either: it
publishes a watcher's `stop` only once its process is gone, and nothing for the arbiter itself.
So we ask circusd. It runs every stop, restart and reload as one exclusive command and refuses
any other exclusive command meanwhile, naming the one it runs ("arbiter is already running
watcher_restart command", or "arbiter is restarting..." for a bare `circusctl restart`). That
command is held until our process is gone, so the answer cannot be stale. The question is an
`add` of the watcher `vm`, which exists: with nothing running, circus rejects it as a
duplicate, so asking never changes anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import zmq

from virby.core import request
from virby.core.config import Config
from virby.core.protocol import CIRCUS_CONTROL
from virby.workers import bus

log = logging.getLogger("virby.vm")

ASK_TIMEOUT = 1.0
# circus's exclusive commands after which no vm worker follows: the guest must be shut down.
# quit / SIGTERM, SIGINT, SIGQUIT to circusd / launchd: arbiter_stop; `circusctl stop vm`:
# watcher_stop; `circusctl stop`: arbiter_stop_watchers; `circusctl rm vm`: arbiter_rm_watcher.
ENDING_COMMANDS = frozenset({"arbiter_stop", "watcher_stop", "arbiter_stop_watchers",
                             "arbiter_rm_watcher"})
_RUNNING = re.compile(r"arbiter is already running (\S+) command")


@dataclass(frozen=True)
class Intent:
    keep_vm: bool
    why: str


def interpret(reply: dict[str, object] | None) -> Intent:
    """What circusd's answer to our `add vm` question means for the VM."""
    if reply is None:
        # A circusd that cannot answer in a second is most likely going away itself.
        return Intent(False, "circusd does not answer: shutting the VM down")
    reason = str(reply.get("reason") or "")
    if "arbiter is restarting" in reason:
        return Intent(True, "circusd restarts all watchers (`circusctl restart`): keeping the VM")
    m = _RUNNING.search(reason)
    if m:
        command = m.group(1)
        if command in ENDING_COMMANDS:
            return Intent(False, f"circusd runs {command}: shutting the VM down")
        return Intent(True, f"circusd runs {command}: keeping the VM for the next vm worker")
    # Nothing exclusive runs: a SIGTERM from someone else. circus respawns us, like after a
    # kill -9, and the next worker adopts the VM.
    return Intent(True, "not stopped by circusd: keeping the VM for the next vm worker")


async def ask(config: Config, *, timeout: float = ASK_TIMEOUT) -> Intent:
    """Ask circusd's control socket (its JSON protocol, as `circusctl` speaks it)."""
    props = {"name": "vm", "cmd": "true", "start": False}
    reply: dict[str, object] | None = None
    req = request.circus_request(config.endpoint(CIRCUS_CONTROL), "add", props,
                                 silent="circusd does not answer")
    try:
        reply = await bus.exchange(req, timeout=timeout)
    except request.NoAnswer:
        pass
    except zmq.ZMQError as e:
        log.warning("cannot ask circusd why we stop: %s", e)
    return interpret(reply)
