"""The wheel installs our folders as virby.supervisor and virby.workers, never as top-level
`supervisor` (PyPI's supervisord owns that name), and carries the guest's files (image/guest/ and
the lock, as virby/image/) so that `virby guest build` works from a pip install. pip builds in
the source tree (`build/`), so the wheel is built from a copy: the checkout is left as it was."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testing.harness import REPO
from tests.require import unavailable
from virby.guestbuild.builder import BuildError, build, default_cache
from virby.guestbuild.report import Report

pytestmark = pytest.mark.integration
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".*_cache", "results")


GUEST_FILES = sorted(p.relative_to(REPO / "image").as_posix()
                     for p in (REPO / "image" / "guest").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "wheels"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("virby-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed alone into a directory (its dependencies come from this venv)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    return site


def run_installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Python with the installed wheel first on the path, away from the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def test_wheel_file_list(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("virby/supervisor/cli.py", "virby/core/config.py", "virby/workers/bus.py",
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


def test_the_wheel_carries_the_guest_files(wheel: Path) -> None:
    """Every file of image/guest/ (init, rc, agent, ...) and the lock, executable bits kept:
    a guest built without them has no init scripts."""
    assert "guest/common/etc/rc" in GUEST_FILES and "guest/common/usr/sbin/virby-agent" in GUEST_FILES
    infos = {i.filename: i for i in zipfile.ZipFile(wheel).infolist()}
    for rel in [*GUEST_FILES, "guest.lock.json"]:
        name = f"virby/image/{rel}"
        assert name in infos, name
        in_wheel = infos[name].external_attr >> 16
        assert bool(in_wheel & 0o111) == os.access(REPO / "image" / rel, os.X_OK), (name, oct(in_wheel))
        assert zipfile.ZipFile(wheel).read(name) == (REPO / "image" / rel).read_bytes(), name
    # image/'s development scripts stay out (boot-guest.py imports testing/)
    assert [n for n in infos if n.startswith("virby/image/") and not n.startswith("virby/image/guest/")] \
        == ["virby/image/guest.lock.json"]


def test_the_installed_wheel_finds_its_guest_files(installed: Path, tmp_path: Path) -> None:
    out = run_installed(installed, tmp_path, "-c",
                        "from virby.guestbuild import builder, spec\n"
                        "builder.check_guest_dir(builder.GUEST_SCRIPTS, 'nix')\n"
                        "print(builder.GUEST_SCRIPTS); print(spec.DEFAULT_LOCK)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(installed / "virby" / "image" / "guest"),
                                       str(installed / "virby" / "image" / "guest.lock.json")]
    agent = installed / "virby" / "image" / "guest" / "common" / "usr" / "sbin" / "virby-agent"
    assert os.access(agent, os.X_OK)


def test_a_guest_build_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    """`virby guest build` of the installed wheel makes the same initrd as the checkout, init
    scripts included. Offline, from the debs cache the guest tests fill (~2 s)."""
    cache = default_cache()
    try:
        ours = build("x86_64", "base", tmp_path / "checkout", cache=cache, offline=True,
                     progress=Report(io.StringIO(), tty=False))
    except BuildError as e:
        unavailable(f"the x86_64 base guest's packages are not all in {cache}: {e}")
    out = run_installed(installed, tmp_path, "-c", "from virby.supervisor.cli import main; main()",
                        "guest", "build", "--arch", "x86_64", "--variant", "base", "--offline",
                        "--cache", str(cache), "--out", str(tmp_path / "wheel"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "wheel")
    initrd = (tmp_path / "wheel" / "initrd.img").read_bytes()
    names = cpio_names(initrd)
    for script in ("etc/inittab", "etc/rc", "usr/sbin/virby-agent", "usr/sbin/virby-sshd"):
        assert script in names, script
    same = hashlib.sha256((ours / "initrd.img").read_bytes()).hexdigest()
    assert hashlib.sha256(initrd).hexdigest() == same  # the same bytes as the checkout's build


def cpio_names(initrd: bytes) -> list[str]:
    data, pos = gzip.decompress(initrd), 0
    names: list[str] = []
    while True:
        namesize, filesize = int(data[pos + 94:pos + 102], 16), int(data[pos + 54:pos + 62], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        pos += 110 + namesize
        pos += (-pos) % 4 + filesize
        pos += (-pos) % 4
