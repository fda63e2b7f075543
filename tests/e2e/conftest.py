"""Fixtures for the real-QEMU tier. The plain test guest is `guest_dir` (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.harness import build_guest, guest_for


@pytest.fixture(scope="session")
def guest_nix_dir() -> Path:
    """The test guest with Nix inside (the `nix` variant), built once into the user's cache dir."""
    return build_guest(with_nix=True)



@pytest.fixture(scope="session")
def guest_aarch64_dir() -> Path:
    return guest_for("aarch64")


@pytest.fixture(scope="session")
def guest_aarch64_nix_dir() -> Path:
    return guest_for("aarch64", with_nix=True)
