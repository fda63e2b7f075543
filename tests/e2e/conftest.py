"""Fixtures for the real-QEMU tier. The plain test guest is `guest_dir` (tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import build_guest


@pytest.fixture(scope="session")
def guest_nix_dir() -> Path:
    """The test guest with Nix inside (the `nix` variant), built once into the user's cache dir."""
    return build_guest(with_nix=True)


def _aarch64_guest(variant: str) -> Path:
    """`virby guest build --arch aarch64`; VIRBY_TEST_AARCH64_<VARIANT>_GUEST names a folder
    built some other way instead (a hand-built guest while the builder cannot make this one)."""
    override = os.environ.get(f"VIRBY_TEST_AARCH64_{variant.upper()}_GUEST")
    if override:
        return Path(override)
    return build_guest(with_nix=variant == "nix", arch="aarch64")


@pytest.fixture(scope="session")
def guest_aarch64_dir() -> Path:
    return _aarch64_guest("base")


@pytest.fixture(scope="session")
def guest_aarch64_nix_dir() -> Path:
    return _aarch64_guest("nix")
