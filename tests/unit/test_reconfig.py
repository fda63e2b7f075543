"""Re-reading the config file (issue 20: an edited config was silently ignored)."""

from __future__ import annotations

import json
from pathlib import Path

from virby.core.config import from_dict
from virby.workers import reconfig


def write(path: Path, **data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_an_edited_config_is_taken_and_the_change_named(tmp_path: Path) -> None:
    base = {"stateDir": str(tmp_path / "s"), "runtimeDir": str(tmp_path / "r"), "memory": 512}
    current = from_dict(base)
    src = write(tmp_path / "c.json", **{**base, "memory": 768, "onDemand": {"pauseAfter": 5}})
    got = reconfig.reread(current, src)
    assert got.error is None and got.refused == []
    assert got.config.memory == 768 and got.config.onDemand.pauseAfter == 5
    assert "memory: 512 -> 768" in got.changed
    assert "onDemand.pauseAfter: 60.0 -> 5.0" in got.changed


def test_a_change_the_arbiter_cannot_take_is_refused_and_the_rest_taken(tmp_path: Path) -> None:
    base = {"stateDir": str(tmp_path / "s"), "runtimeDir": str(tmp_path / "r"), "port": 31222}
    current = from_dict(base)
    src = write(tmp_path / "c.json", **{**base, "port": 31299, "runtimeDir": str(tmp_path / "x"),
                                        "cores": 2})
    got = reconfig.reread(current, src)
    assert got.config.port == 31222 and got.config.runtimeDir == str(tmp_path / "r")
    assert got.config.cores == 2
    assert [line.split(":")[0] for line in got.refused] == ["port", "runtimeDir"]
    assert all("needs `virby run` restarted" in line for line in got.refused)


def test_a_broken_file_changes_nothing_and_says_why(tmp_path: Path) -> None:
    current = from_dict({"stateDir": str(tmp_path / "s"), "runtimeDir": str(tmp_path / "r")})
    bad = tmp_path / "c.json"
    bad.write_text('{"memory": "lots"}')
    got = reconfig.reread(current, str(bad))
    assert got.config == current and got.changed == []
    assert got.error is not None and "memory" in got.error and "keeping the config in use" in got.error


def test_no_source_file_means_nothing_to_reread(tmp_path: Path) -> None:
    current = from_dict({"stateDir": str(tmp_path / "s"), "runtimeDir": str(tmp_path / "r")})
    got = reconfig.reread(current, None)
    assert got.config == current and got.changed == [] and got.error is None
