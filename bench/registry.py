"""The benchmarks, in the order a full run takes them. Each is a module `bench.<name>` with
`run(ctx: Context) -> Result`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from bench.common import Context, Result

NAMES = ("footprint", "status", "throughput", "warm", "resume", "cold", "restore", "nixbuild", "manydrv",
         "storm",
         "release", "warm_aarch64", "cold_aarch64")
# Benchmarks that use the shared running instance (closed after the last of them).
USES_RUNNING = ("warm", "resume")


def runner(name: str) -> Callable[[Context], Result]:
    module = importlib.import_module(f"bench.{name}")
    fn: Callable[[Context], Result] = module.run
    return fn
