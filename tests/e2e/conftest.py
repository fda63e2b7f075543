"""Fixtures for the real-QEMU tier: the Linux test guest, built once into the user's cache dir."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def build_test_guest(with_nix: bool) -> Path:
    """Run image/build-test-guest.sh (a no-op when its stamp is current); return OUTDIR."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = cache / "virby" / ("guest-nix" if with_nix else "guest")
    env = {**os.environ, "WITH_NIX": "1" if with_nix else "0"}
    proc = subprocess.run(["bash", str(REPO / "image" / "build-test-guest.sh"), str(out)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"build-test-guest.sh failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return out


@pytest.fixture(scope="session")
def test_guest() -> Path:
    """The directory holding vmlinuz and initrd.img of the plain test guest."""
    return build_test_guest(with_nix=False)


@pytest.fixture(scope="session")
def test_guest_nix() -> Path:
    """The same guest with Nix inside (WITH_NIX=1); boot it with at least 256 MiB."""
    return build_test_guest(with_nix=True)
