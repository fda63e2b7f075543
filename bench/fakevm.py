"""A stand-in vm worker for `bench.throughput`: `VIRBY_CONFIG=... python -m bench.fakevm PORT`.

It speaks the real bus protocol (workers/bus.py `Node` and `ControlServer`): it broadcasts
`running` with the guest endpoint 127.0.0.1:PORT (a host-side sink) and answers every command
with that state, so the real forwarder process runs its real code path with no VM behind it."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from virby.core.config import load_for_worker
from virby.workers import bus


async def main(port: int) -> None:
    config = load_for_worker()
    node = bus.Node("vm", config)
    state: dict[str, Any] = {"state": "running", "endpoint": ["127.0.0.1", port], "boots": 0,
                             "backend": "fake", "since": 0.0, "reason": None}
    node.state = dict(state)

    async def handle(cmd: str, args: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        return True, None, dict(state)

    control = bus.ControlServer(config, handle)
    await node.start()
    control.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await control.close()
    await node.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
