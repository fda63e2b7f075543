"""The wheel installs our folders as virby.supervisor and virby.workers, never as top-level
`supervisor` (PyPI's supervisord owns that name). pip builds in the source tree (`build/`), so
the wheel is built from a copy: the checkout is left as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.integration
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".*_cache", "results")


def test_wheel_file_list(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = out.glob("virby-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("virby/supervisor/cli.py", "virby/supervisor/config.py", "virby/workers/bus.py",
                   "virby/workers/vm.py", "virby/workers/forwarder.py", "virby/workers/idle.py",
                   "virby/workers/backends/qemu/backend.py",
                   "virby/workers/backends/vfkit/backend.py", "virby/workers/backends/vfkit/rest.py"):
        assert module in names, module
    top = {n.split("/")[0] for n in names}
    assert "supervisor" not in top and "workers" not in top and "tests" not in top
    assert top <= {"virby", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "virby = virby.supervisor.cli:main" in text


def test_the_installed_package_imports_as_virby() -> None:
    out = subprocess.run([sys.executable, "-c",
                          "import virby.supervisor.cli, virby.workers.vm; print(virby.workers.vm.__name__)"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "virby.workers.vm"
