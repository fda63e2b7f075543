"""What `virby ssh-config` and `virby nix-machines` print."""

from __future__ import annotations

import base64
from pathlib import Path

from click.testing import CliRunner

from tests.builders_dir import make_builders_dir
from virby.core.config import from_dict
from virby.core.keys import ensure_keys
from virby.supervisor.cli import cli
from virby.supervisor.sshconfig import nix_machines_line, ssh_config_text


def test_ssh_config_block(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "port": 40022, "readyTimeout": 45})
    text = ssh_config_text(c, mux_users=("root", "alice"))
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
        # one connection for many derivations, for who may create the socket in the runtime
        # dir; ControlPersist half of pauseAfter (60 s), at most 30 s
        "Match originalhost virby-vm localuser root,alice",
        "  ControlMaster auto",
        f"  ControlPath {c.runtimeDir}/ssh-%C",
        "  ControlPersist 30",
    ]


def test_control_persist_stays_below_the_idle_pause(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "onDemand": {"pauseAfter": 10, "stopAfter": 20}})
    assert "  ControlPersist 5" in ssh_config_text(c).splitlines()
    c = from_dict({"stateDir": str(tmp_path), "onDemand": {"pauseAfter": None, "stopAfter": 3}})
    assert "  ControlPersist 1" in ssh_config_text(c).splitlines()


def test_no_shared_connection_when_the_socket_path_would_not_fit(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "runtimeDir": "/tmp/" + "r" * 60})
    assert "ControlMaster" not in ssh_config_text(c)


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



def test_a_builders_directory_gives_one_machines_line_per_builder_with_its_systems(tmp_path: Path) -> None:
    d = make_builders_dir(tmp_path)
    r = CliRunner().invoke(cli, ["nix-machines", "--config", str(d)])
    assert r.exit_code == 0, r.output
    lines = [line.split() for line in r.output.splitlines()]
    assert [f[:3] for f in lines] == [
        ["ssh-ng://virby-arm", "aarch64-linux,x86_64-linux", f"{tmp_path}/virby-arm/ssh_user_ed25519_key"],
        ["ssh-ng://virby-x86", "x86_64-linux", f"{tmp_path}/virby-x86/ssh_user_ed25519_key"],
    ]


def test_status_of_a_builders_directory_names_every_builder_even_when_down(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["status", "--config", str(make_builders_dir(tmp_path))])
    assert r.exit_code == 1
    assert "== virby-arm: aarch64-linux,x86_64-linux, 127.0.0.1:40011" in r.output
    assert "== virby-x86: x86_64-linux, 127.0.0.1:40012" in r.output
    assert r.output.count("virby is not running") == 2


def test_one_builder_commands_refuse_a_directory(tmp_path: Path) -> None:
    d = make_builders_dir(tmp_path)
    r = CliRunner().invoke(cli, ["stop", "--config", str(d)])
    assert r.exit_code == 2 and "is a directory of builders" in r.output
