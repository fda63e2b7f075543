"""warm_aarch64: `warm` for the aarch64 guest; its VM is closed when it is done."""

from __future__ import annotations

from bench import warm
from bench.common import Context, Result

NAME = "warm_aarch64"


def run(ctx: Context) -> Result:
    try:
        return warm.run(ctx, arch="aarch64")
    finally:
        ctx.close()
