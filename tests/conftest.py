"""Shared fixtures. Tiers: tests/unit (fast, no processes: tests/unit/conftest.py refuses them),
tests/integration (real circusd and ZeroMQ, no VM, or another real program), tests/e2e (a real
QEMU guest). All run in CI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.harness import Instance, build_guest


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    return build_guest(with_nix=False)


@pytest.fixture
def instance() -> Iterator[Instance]:
    """A running Virby with no guest files: the arbiter and bus work, boots fail cleanly."""
    with Instance(guest_dir=None) as inst:
        inst.start()
        yield inst
