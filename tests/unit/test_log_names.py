"""`virby logs <name>` shows each log Virby writes: the name it takes and the file the writer
(circus for the watchers, the backends for the console and the hypervisor) uses come from one
table (core/watchers.py). No process is started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from virby.core import watchers
from virby.core.config import Config, load
from virby.core.keys import KeyPaths
from virby.supervisor import circus_ini
from virby.supervisor.cli import cli
from virby.workers.backends.qemu import QemuBackend
from virby.workers.backends.vfkit.backend import VfkitBackend


def _config(tmp_path: Path) -> tuple[Path, Config]:
    conf = tmp_path / "virby.json"
    conf.write_text(json.dumps({"runtimeDir": str(tmp_path / "run"), "stateDir": str(tmp_path / "state")}))
    config = load(str(conf))
    os.makedirs(config.log_dir)
    return conf, config


def _logs(conf: Path, name: str) -> str:
    r = CliRunner().invoke(cli, ["logs", "--config", str(conf), "-n", "5", name])
    assert r.exit_code == 0, r.output
    return r.output


def test_each_log_the_hypervisors_and_the_console_write_is_shown_by_its_name(tmp_path: Path) -> None:
    conf, config = _config(tmp_path)
    keys = KeyPaths.in_dir(config.stateDir)
    qemu, vfkit = QemuBackend(config, keys), VfkitBackend(config, keys)
    for name, path in (("qemu", qemu.qemu_log), ("vfkit", vfkit.vfkit_log),
                       ("console", qemu.console_log)):
        Path(path).write_text(f"written by the {name} writer\n")
        assert _logs(conf, name) == f"written by the {name} writer\n"
    assert vfkit.console_log == qemu.console_log


def test_each_watchers_log_is_shown_by_its_name(tmp_path: Path) -> None:
    conf, config = _config(tmp_path)
    ini = circus_ini.render(config)
    for name in ("circusd", *watchers.NAMES):
        # the file circus writes the watcher's stderr (or circusd's own log) to
        path = f"{config.log_dir}/{name}.log"
        assert path in ini or path == circus_ini.logger_config(config)["handlers"]["file"]["filename"]  # type: ignore[index]
        Path(path).write_text(f"from {name}\n")
        assert _logs(conf, name) == f"from {name}\n"


@pytest.mark.parametrize("name", ["virtiofsd", "hypervisor", "vm.out"])
def test_a_name_that_is_no_log_is_refused(tmp_path: Path, name: str) -> None:
    conf, _ = _config(tmp_path)
    r = CliRunner().invoke(cli, ["logs", "--config", str(conf), name])
    assert r.exit_code == 2 and "Invalid value" in r.output
