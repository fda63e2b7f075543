"""The wheel installs our folders as virby.supervisor and virby.workers, never as top-level
`supervisor` (PyPI's supervisord owns that name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness import REPO


def test_wheel_file_list(tmp_path: Path) -> None:
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    finally:
        shutil.rmtree(REPO / "build", ignore_errors=True)  # pip builds in the source tree
    [wheel] = tmp_path.glob("virby-*.whl")
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
