"""What `virby ssh-config` and `virby nix-machines` print."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from click.testing import CliRunner

from virby.supervisor.cli import cli
from virby.supervisor.config import from_dict
from virby.supervisor.sshconfig import nix_machines_line, ssh_config_text
from virby.workers.keys import ensure_keys


def test_ssh_config_block(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "port": 40022, "readyTimeout": 45})
    text = ssh_config_text(c)
    assert text.splitlines() == [
        "Host virby-vm",
        "  HostName 127.0.0.1",
        "  Port 40022",
        "  User builder",
        f"  IdentityFile {tmp_path}/ssh_user_ed25519_key",
        "  IdentitiesOnly yes",
        f"  GlobalKnownHostsFile {tmp_path}/ssh_known_hosts",
        "  UserKnownHostsFile /dev/null",
        "  HostKeyAlias virby-vm-key",
        "  StrictHostKeyChecking yes",
        "  ConnectTimeout 60",
        "  BatchMode yes",
    ]


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


def test_nix_machines_line(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "cores": 3})
    keys = ensure_keys(c.stateDir)
    fields = nix_machines_line(c, speed_factor=2).split()
    assert fields[:7] == ["ssh-ng://virby-vm", "x86_64-linux", keys.client_key, "3", "2",
                          "benchmark,big-parallel", "-"]
    assert base64.b64decode(fields[7]).decode().split() == Path(keys.host_pub).read_text().split()[:2]


def test_nested_virtualization_adds_kvm_features(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "nestedVirtualization": True})
    assert nix_machines_line(c).split()[5] == "benchmark,big-parallel,kvm,nixos-test"


def test_cli_prints_them(tmp_path: Path) -> None:
    cfg = tmp_path / "virby.json"
    cfg.write_text(f'{{"stateDir": "{tmp_path}", "port": 40001}}')
    r = CliRunner().invoke(cli, ["ssh-config", "--config", str(cfg)])
    assert r.exit_code == 0 and "  Port 40001\n" in r.output
    r = CliRunner().invoke(cli, ["nix-machines", "--config", str(cfg), "--protocol", "ssh"])
    assert r.exit_code == 0 and r.output.startswith("ssh://virby-vm ")
