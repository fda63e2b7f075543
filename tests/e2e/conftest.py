"""Fixtures for the real-QEMU tier. The plain test guest is `guest_dir` (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import build_guest


@pytest.fixture(scope="session")
def guest_nix_dir() -> Path:
    """The test guest with Nix inside (the `nix` variant), built once into the user's cache dir."""
    return build_guest(with_nix=True)
