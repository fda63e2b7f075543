"""Config loading: every key validated, errors name the key, exit status 2 before anything
starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from virby.core import config as cfg
from virby.supervisor.cli import cli

# (case id, document, key the message must name)
BAD: list[tuple[str, Any, str]] = [
    ("backend-unknown", {"backend": "xen"}, "backend"),
    ("backend-type", {"backend": 1}, "backend"),
    ("port-low", {"port": 80}, "port"),
    ("port-high", {"port": 70000}, "port"),
    ("port-string", {"port": "31222"}, "port"),
    ("port-bool", {"port": True}, "port"),
    ("cores-zero", {"cores": 0}, "cores"),
    ("cores-float", {"cores": 1.5}, "cores"),
    ("memory-word", {"memory": "lots"}, "memory"),
    ("memory-small", {"memory": 64}, "memory"),
    ("memory-negative", {"memory": -5}, "memory"),
    ("memory-unit", {"memory": "6 PiB"}, "memory"),
    ("memory-bool", {"memory": False}, "memory"),
    ("disk-tiny", {"diskSize": "10"}, "diskSize"),
    ("disk-word", {"diskSize": "big"}, "diskSize"),
    ("ondemand-type", {"onDemand": "yes"}, "onDemand"),
    ("ondemand-enable", {"onDemand": {"enable": "true"}}, "onDemand.enable"),
    ("ondemand-pause-neg", {"onDemand": {"pauseAfter": -1}}, "onDemand.pauseAfter"),
    ("ondemand-stop-str", {"onDemand": {"stopAfter": "10m"}}, "onDemand.stopAfter"),
    ("ondemand-order", {"onDemand": {"pauseAfter": 60, "stopAfter": 30}}, "onDemand.stopAfter"),
    ("ondemand-unknown", {"onDemand": {"ttl": 180}}, "onDemand.ttl"),
    ("statedir-type", {"stateDir": 5}, "stateDir"),
    ("statedir-empty", {"stateDir": ""}, "stateDir"),
    ("runtimedir-long", {"runtimeDir": "/tmp/" + "x" * 120}, "runtimeDir"),
    ("guest-type", {"guest": "vmlinuz"}, "guest"),
    ("guest-kernel-type", {"guest": {"kernel": 5}}, "guest.kernel"),
    ("guest-cmdline-lines", {"guest": {"cmdline": "a\nb"}}, "guest.cmdline"),
    ("guest-unknown", {"guest": {"firmware": "x"}}, "guest.firmware"),
    ("sshuser-space", {"sshUser": "Root User"}, "sshUser"),
    ("sshuser-empty", {"sshUser": ""}, "sshUser"),
    ("rosetta-string", {"rosetta": "yes"}, "rosetta"),
    ("nested-int", {"nestedVirtualization": 1}, "nestedVirtualization"),
    ("shared-list", {"sharedDirectories": ["/tmp"]}, "sharedDirectories"),
    ("shared-tag", {"sharedDirectories": {"a b": "/tmp"}}, "sharedDirectories.a b"),
    ("shared-path-type", {"sharedDirectories": {"src": 5}}, "sharedDirectories.src"),
    ("debug-string", {"debug": "no"}, "debug"),
    ("ready-zero", {"readyTimeout": 0}, "readyTimeout"),
    ("ready-string", {"readyTimeout": "60"}, "readyTimeout"),
    ("accel-unknown", {"accel": "fast"}, "accel"),
    ("hypervisor-empty", {"hypervisor": ""}, "hypervisor"),
    ("arch-unknown", {"arch": "riscv64"}, "arch"),
    ("arch-debian-name", {"arch": "arm64"}, "arch"),
    ("name-space", {"name": "virby vm"}, "name"),
    ("unknown-key", {"ttl": 180}, "ttl"),
    ("top-list", [1, 2], "(top level)"),
]


@pytest.mark.parametrize(("case", "doc", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, case: str, doc: Any, key: str) -> None:
    path = tmp_path / "virby.json"
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["status", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert f"'{key}'" in result.output or key in result.output
    assert "config key" in result.output or key == "(top level)"
    assert len(result.output.strip().splitlines()) == 1  # one clear line


def test_the_message_names_value_and_expectation() -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.from_dict({"port": 80})
    assert str(e.value) == "config key 'port': got 80, expected a whole number from 1024 to 65535"


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(cfg.ConfigError, match=r"unknown key .*known: .*readyTimeout"):
        cfg.from_dict({"readytimeout": 5})


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.toml", "port = = 3", "not valid TOML"),
])
def test_unparsable_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = CliRunner().invoke(cli, ["ssh-config", "--config", str(path)])
    assert result.exit_code == 2
    assert message in result.output and str(path) in result.output


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["ssh-config", "--config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "No such file" in result.output


def test_no_file_at_all_gives_working_linux_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg.sys, "platform", "linux")
    c = cfg.from_dict({})
    assert (c.backend, c.port, c.memory, c.sshUser) == ("qemu", 31222, 512, "builder")
    assert c.onDemand == cfg.OnDemand(enable=True, pauseAfter=60.0, stopAfter=600.0)
    assert c.guest.kernel.endswith("-nix/vmlinuz") and "/virby/guests/" in c.guest.kernel
    assert c.guest.cmdline.startswith("console=ttyS0")
    assert os.path.isabs(c.stateDir) and os.path.isabs(c.runtimeDir)


def test_darwin_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg.sys, "platform", "darwin")
    c = cfg.from_dict({})
    assert c.backend == "vfkit"
    assert c.stateDir == "/var/lib/virby" and c.runtimeDir == "/var/lib/virby/run"
    assert c.guest.cmdline.startswith("console=hvc0")
    assert "virby.net=dhcp" in c.guest.cmdline.split()  # vfkit's NAT hands out the address
    assert c.hypervisor == "vfkit"


@pytest.mark.parametrize(("value", "mib"), [(6144, 6144), ("6GiB", 6144), ("512M", 512),
                                            ("1.5 GiB", 1536), ("2g", 2048)])
def test_memory_forms(value: Any, mib: int) -> None:
    assert cfg.from_dict({"memory": value}).memory == mib


def test_toml_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "virby.toml"
    path.write_text('port = 40000\nstateDir = "state"\n[guest]\nkernel = "g/vmlinuz"\n'
                    '[onDemand]\npauseAfter = 5\nstopAfter = 10\n')
    c = cfg.load(path)
    assert c.port == 40000
    assert c.stateDir == str(tmp_path / "state")
    assert c.guest.kernel == str(tmp_path / "g" / "vmlinuz")
    assert (c.onDemand.pauseAfter, c.onDemand.stopAfter) == (5.0, 10.0)


def test_null_disables_a_stage() -> None:
    c = cfg.from_dict({"onDemand": {"pauseAfter": None, "stopAfter": 30}})
    assert c.onDemand.pauseAfter is None and c.onDemand.stopAfter == 30.0


def test_resolved_config_round_trips() -> None:
    c = cfg.from_dict({"memory": "1GiB", "diskSize": "50GiB", "sharedDirectories": {"src": "/srv"},
                       "onDemand": {"enable": False, "pauseAfter": None}})
    again = cfg.from_dict(json.loads(c.to_json()))
    assert again == c



@pytest.mark.parametrize(("machine", "arch"), [("x86_64", "x86_64"), ("aarch64", "aarch64"),
                                               ("arm64", "aarch64")])
def test_arch_defaults_to_the_hosts_and_picks_the_hypervisor(
        monkeypatch: pytest.MonkeyPatch, machine: str, arch: str) -> None:
    monkeypatch.setattr(cfg.sys, "platform", "linux")
    monkeypatch.setattr(cfg.os, "uname", lambda: os.uname_result(("Linux", "h", "6", "#1", machine)))
    c = cfg.from_dict({})
    assert (c.arch, c.hypervisor) == (arch, f"qemu-system-{arch}")


def test_an_aarch64_guest_on_qemu_gets_the_pl011_console() -> None:
    c = cfg.from_dict({"arch": "aarch64", "backend": "qemu"})
    assert c.hypervisor == "qemu-system-aarch64"
    assert c.guest.cmdline == "console=ttyAMA0 quiet panic=-1"
    assert cfg.from_dict({"arch": "aarch64", "backend": "vfkit"}).guest.cmdline.startswith("console=hvc0")


def test_arch_error_says_what_is_allowed() -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.from_dict({"arch": "arm64"})
    assert str(e.value) == ('config key \'arch\': got "arm64", expected "x86_64" or "aarch64" '
                            "(the guest's CPU)")


def _builder(d: Path, name: str, **over: Any) -> None:
    doc = {"name": name, "port": over.pop("port", 40000 + len(list(d.iterdir()))),
           "stateDir": str(d / name / "state"), "runtimeDir": f"/tmp/vb-{name}", **over}
    (d / f"{name}.json").write_text(json.dumps(doc))


def test_a_directory_holds_one_config_per_builder(tmp_path: Path) -> None:
    _builder(tmp_path, "virby-x86", arch="x86_64", port=40001)
    _builder(tmp_path, "virby-arm", arch="aarch64", port=40002, onDemand={"stopAfter": 120})
    (tmp_path / "notes.txt").write_text("not a config")
    arm, x86 = cfg.load_builders(tmp_path)  # file name order
    assert (arm.name, arm.arch, arm.port, arm.onDemand.stopAfter) == ("virby-arm", "aarch64", 40002, 120.0)
    assert (x86.name, x86.arch, x86.port) == ("virby-x86", "x86_64", 40001)
    assert cfg.load_builders(tmp_path / "virby-x86.json") == [x86]


@pytest.mark.parametrize("key", ["name", "port", "stateDir", "runtimeDir"])
def test_two_builders_cannot_share(tmp_path: Path, key: str) -> None:
    _builder(tmp_path, "a", port=40001)
    _builder(tmp_path, "b", port=40002)
    doc = json.loads((tmp_path / "a.json").read_text())
    shared = json.loads((tmp_path / "b.json").read_text())
    shared[key] = doc[key]
    (tmp_path / "b.json").write_text(json.dumps(shared))
    with pytest.raises(cfg.ConfigError, match=f"config key '{key}'.*a.json.*b.json.*its own"):
        cfg.load_builders(tmp_path)


def test_an_empty_builders_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="no builder config"):
        cfg.load_builders(tmp_path)


def test_the_default_guest_follows_arch() -> None:
    c = cfg.from_dict({"arch": "aarch64"})
    assert c.guest.kernel.endswith("virby/guests/aarch64-nix/vmlinuz")
    assert cfg.from_dict({"arch": "x86_64"}).guest.initrd.endswith("virby/guests/x86_64-nix/initrd.img")
