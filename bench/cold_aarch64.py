"""cold_aarch64: `cold` for the aarch64 guest (the Mac's guest bytes, emulated here)."""

from __future__ import annotations

from bench import cold
from bench.common import Context, Result

NAME = "cold_aarch64"


def run(ctx: Context) -> Result:
    return cold.run(ctx, arch="aarch64")
