"""The guest's wall clock, read over SSH, against the host's: what a build in the guest sees."""

from __future__ import annotations

import time
from dataclasses import dataclass

from testing.harness import Instance

# busybox's date has no %N: its adjtimex prints the time in µs
_READ = ("read up idle < /proc/uptime; busybox adjtimex | "
         "awk -v up=$up '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf \"%s %d.%06d\\n\", up, s, u}'")


@dataclass(frozen=True)
class Reading:
    uptime: float  # the guest's
    wall: float  # the guest's wall clock
    before: float  # the host's wall clock around the SSH round trip
    after: float

    @property
    def off(self) -> float:
        """How far the guest's clock lies outside the host's [before, after], signed (0 inside
        it): a slow round trip on a loaded machine widens the bracket, it is not skew."""
        return self.wall - self.after if self.wall > self.after else min(self.wall - self.before, 0.0)

    def __str__(self) -> str:
        return (f"guest clock {self.wall:.3f}, host's [{self.before:.3f}, {self.after:.3f}]: "
                f"{self.off:+.3f}s off")


def read(inst: Instance) -> Reading:
    """One SSH connection per reading: an open one would resume a paused VM at once."""
    before = time.time()
    out = inst.ssh(_READ)
    after = time.time()
    assert out.returncode == 0, out.stderr
    up, wall = (float(x) for x in out.stdout.split())
    return Reading(up, wall, before, after)


def clock_lines(inst: Instance) -> str:
    """What the vm worker and the guest said about the clock: for a failure's message."""
    logs = inst.dir / "state" / "logs"
    lines = [line for name in ("vm.log", "console.log") if (logs / name).exists()
             for line in (logs / name).read_text(errors="replace").splitlines() if "clock" in line]
    return "\n".join(lines[-20:])


CONFIRMED = "guest clock set (answered in"  # the vm worker's log: the agent's answer came quickly


def wait_confirmed(inst: Instance, times: int = 1, timeout: float = 30) -> None:
    """Until the vm worker has seen the agent confirm a clock setting `times` times."""
    try:
        inst.wait_log("vm", CONFIRMED, timeout, times)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{clock_lines(inst)}") from None
