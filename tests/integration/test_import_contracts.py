"""The import contracts in .importlinter (an allow-list of layers) fail when they are broken:
`lint-imports` runs on a copy of the package with one forbidden import, or one module in no
layer, injected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testing.harness import REPO

pytestmark = pytest.mark.integration

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


FOLDERS = ("core", "guestbuild", "supervisor", "workers")


def lint_copy(tmp_path: Path, inject: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Lay the package's folders out as virby.* under tmp_path (as the wheel installs them),
    append the given lines (a missing module is created), and run lint-imports there with the
    real contracts."""
    for folder in FOLDERS:
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


LAYERS = "Layers: the CLI and the workers side by side"


def test_the_unmodified_copy_keeps_every_contract(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 5 kept, 0 broken." in out.stdout


def test_a_worker_importing_the_cli_breaks_the_layers(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"workers/idle.py": "import virby.supervisor.control"})
    assert out.returncode != 0
    assert LAYERS in out.stdout and "Contracts: 4 kept, 1 broken." in out.stdout, out.stdout
    assert "virby.workers.idle -> virby.supervisor.control" in out.stdout


def test_the_cli_importing_the_bus_breaks_the_layers(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"supervisor/statusview.py": "from virby.workers import bus"})
    assert out.returncode != 0
    assert "virby.supervisor.statusview -> virby.workers.bus" in out.stdout


def test_the_cli_importing_a_new_worker_module_breaks_the_layers(tmp_path: Path) -> None:
    """The old deny-list named the worker modules the CLI could not import: a new one slipped
    through. The layers forbid the whole of virby.workers."""
    out = lint_copy(tmp_path, {"workers/brandnew.py": "X = 1",
                               "supervisor/statusview.py": "from virby.workers import brandnew"})
    assert out.returncode != 0
    assert "virby.supervisor.statusview -> virby.workers.brandnew" in out.stdout


def test_core_importing_a_worker_breaks_the_layers(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"core/config.py": "import virby.workers.bus"})
    assert out.returncode != 0
    assert "virby.core.config -> virby.workers.bus" in out.stdout


def test_a_worker_module_in_no_layer_breaks_the_worker_layers(tmp_path: Path) -> None:
    out = lint_copy(tmp_path, {"workers/brandnew.py": "X = 1"})
    assert out.returncode != 0
    assert "virby.workers.brandnew" in out.stdout, out.stdout
