"""Fixtures for the reliability tier (marker `reliability`): real circusd, real bus, and for
most tests a real QEMU guest already running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.harness import Instance


def boot(inst: Instance) -> Instance:
    inst.start()
    inst.cli("start", timeout=120)
    inst.wait_vm("running", timeout=120)
    return inst


@pytest.fixture(scope="module")
def booted(guest_dir: Path) -> Iterator[Instance]:
    """One running VM shared by a module's tests (a boot costs seconds under TCG). Idle pause
    and stop are far away."""
    with Instance(guest_dir=guest_dir) as inst:
        yield boot(inst)
