"""Unit-tier checks that need a real process: `virby run` refusing a bad config, and what our
files look like to the programs that read them (dropbearkey, OpenSSH)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders_dir import make_builders_dir
from virby.core.config import from_dict
from virby.core.keys import ensure_keys
from virby.supervisor.cli import cli
from virby.supervisor.sshconfig import ssh_config_text

pytestmark = pytest.mark.integration


def test_run_with_a_bad_config_exits_2_before_starting_anything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = tmp_path / "virby.json"
    path.write_text(json.dumps({"runtimeDir": str(run_dir), "stateDir": str(tmp_path / "s"),
                                "memory": "lots"}))
    out = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "config key 'memory'" in out.stderr
    assert not run_dir.exists() and not (tmp_path / "s").exists()


def test_the_dropbear_key_is_the_same_key(tmp_path: Path) -> None:
    keys = ensure_keys(str(tmp_path))
    out = subprocess.run(["dropbearkey", "-y", "-f", keys.host_key_dropbear],
                         capture_output=True, text=True, check=True).stdout
    dropbear_pub = next(line for line in out.splitlines() if line.startswith("ssh-ed25519"))
    assert dropbear_pub.split()[1] == Path(keys.host_pub).read_text().split()[1]


def test_openssh_reads_it_as_intended(tmp_path: Path) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(ssh_config_text(from_dict({"stateDir": str(tmp_path), "port": 40022})))
    out = subprocess.run(["ssh", "-G", "-F", str(path), "virby-vm"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    settings = dict(line.split(" ", 1) for line in out)
    assert settings["hostname"] == "127.0.0.1" and settings["port"] == "40022"
    assert settings["user"] == "builder" and settings["hostkeyalias"] == "virby-vm-key"
    assert settings["stricthostkeychecking"] in ("yes", "true")
    assert settings["identitiesonly"] == "yes"
    # one shared connection for the Nix daemon's user (root runs this tier), socket in the runtime dir
    c = from_dict({"stateDir": str(tmp_path), "port": 40022})
    assert settings["controlmaster"] == "auto" and settings["controlpersist"] == "30"
    assert settings["controlpath"].startswith(c.runtime("ssh-")) and len(settings["controlpath"]) == len(
        c.runtime("ssh-")) + 40



def test_each_builders_alias_reaches_its_own_port_with_its_own_key(tmp_path: Path) -> None:
    d = make_builders_dir(tmp_path)
    r = CliRunner().invoke(cli, ["ssh-config", "--config", str(d)])
    assert r.exit_code == 0, r.output
    path = tmp_path / "ssh_config"
    path.write_text(r.output)
    for host, port in (("virby-arm", "40011"), ("virby-x86", "40012")):
        out = subprocess.run(["ssh", "-G", "-F", str(path), host], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        settings = dict(line.split(" ", 1) for line in out)
        assert settings["port"] == port
        assert settings["identityfile"] == f"{tmp_path}/{host}/ssh_user_ed25519_key"
        assert settings["globalknownhostsfile"] == f"{tmp_path}/{host}/ssh_known_hosts"
