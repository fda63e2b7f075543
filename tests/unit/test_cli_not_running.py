"""Every command that needs the arbiter says so the same way when it is not there (one check,
control.require_running): exit 1, one line, how to start it. No process is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from virby.supervisor.cli import cli


@pytest.mark.parametrize("args", [
    ["status"], ["stop"], ["pause"], ["resume"], ["start"], ["reload"], ["events"],
    ["events", "-f"], ["ssh", "--", "true"], ["forward", "8080"],
])
def test_each_command_gives_the_same_not_running_line(tmp_path: Path, args: list[str]) -> None:
    conf = tmp_path / "virby.json"
    conf.write_text(json.dumps({"runtimeDir": str(tmp_path / "run"), "stateDir": str(tmp_path / "state")}))
    command, rest = args[0], args[1:]
    r = CliRunner().invoke(cli, [command, "--config", str(conf), *rest])
    assert r.exit_code == 1, r.output
    ctl = f"ipc://{tmp_path}/run/"
    assert r.output.splitlines()[-1].startswith(f"virby: virby is not running: no arbiter at {ctl}"), r.output
    assert r.output.rstrip().endswith("(start it with `virby run`)")
