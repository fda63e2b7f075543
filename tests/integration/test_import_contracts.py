"""The import contracts in .importlinter (DESIGN.md: data flows one way) fail when they are
broken: `lint-imports` runs on a copy of the package with one forbidden import injected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.integration

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_copy(tmp_path: Path, inject: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Lay supervisor/ and workers/ out as virby.* under tmp_path (as the wheel installs
    them), append the given import lines, and run lint-imports there with the real contracts."""
    for folder in ("supervisor", "workers"):
        shutil.copytree(REPO / folder, tmp_path / "virby" / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for module, line in inject.items():
        with open(tmp_path / "virby" / module, "a") as f:
            f.write(f"\n{line}  # injected by the test\n")
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    # PYTHONPATH puts the copy ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_unmodified_copy_keeps_both_contracts(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 3 kept, 0 broken." in out.stdout


def test_a_worker_importing_the_cli_breaks_the_contract(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"workers/idle.py": "import virby.supervisor.cli"})
    assert out.returncode != 0
    assert "Workers import nothing from supervisor/ but its config BROKEN" in out.stdout
    assert "virby.workers.idle -> virby.supervisor.cli" in out.stdout


def test_the_cli_importing_the_bus_breaks_the_contract(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"supervisor/statusview.py": "from virby.workers import bus"})
    assert out.returncode != 0
    assert "The CLI speaks the protocol, never the workers' bus, processes or backends BROKEN" in out.stdout
    assert "virby.supervisor.statusview -> virby.workers.bus" in out.stdout
