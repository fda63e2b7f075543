"""Connection activity as the forwarders report it, for the vm worker and the idle monitor.

During `circusctl reload forwarder` two forwarders run at once, each with its own incarnation,
so counts are kept per incarnation and summed over those heard from recently. A forwarder that
went silent has lost its connections with its process: it counts as zero from then on, and the
moment it was last heard from counts as activity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from virby.workers.bus import PEER_TIMEOUT, Message


@dataclass
class _Forwarder:
    open: int
    last_activity: float  # wall time of its last open or close
    heard: float  # time.monotonic() of its last message
    heard_wall: float


class Activity:
    def __init__(self) -> None:
        self._by_inc: dict[str, _Forwarder] = {}
        self._gone_activity = 0.0

    def observe(self, msg: Message) -> None:
        if msg.sender != "forwarder":
            return
        data = msg.data
        open_ = data.get("open")
        last = data.get("last_activity")
        if msg.kind != "state" or not isinstance(open_, int) or not isinstance(last, int | float):
            if msg.kind == "event" and msg.inc in self._by_inc:
                f = self._by_inc[msg.inc]
                f.heard, f.heard_wall, f.last_activity = time.monotonic(), time.time(), msg.t
            return
        self._by_inc[msg.inc] = _Forwarder(max(0, open_), float(last), time.monotonic(), time.time())

    def _prune(self) -> None:
        now = time.monotonic()
        for inc, f in list(self._by_inc.items()):
            if now - f.heard > PEER_TIMEOUT:
                self._gone_activity = max(self._gone_activity, f.heard_wall, f.last_activity)
                del self._by_inc[inc]

    def open_connections(self) -> int:
        self._prune()
        return sum(f.open for f in self._by_inc.values())

    def heard_any(self) -> bool:
        """Whether any forwarder has reported yet: until one has, the last activity is unknown
        (0.0 would read as "idle since 1970")."""
        return bool(self._by_inc) or self._gone_activity > 0

    def last_activity(self) -> float:
        self._prune()
        return max([self._gone_activity, *(f.last_activity for f in self._by_inc.values())])

    def forwarders(self) -> int:
        self._prune()
        return len(self._by_inc)
