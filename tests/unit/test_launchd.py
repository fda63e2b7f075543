"""The launchd job: rendered, parsed back with plistlib, every key checked."""

from __future__ import annotations

import plistlib

from virby.core import watchers
from virby.core.config import from_dict
from virby.supervisor import launchd

CONFIG_PATH = "/etc/virby/config.json"
VIRBY = "/nix/store/abc-virby-0.1.0/bin/virby"
VFKIT = "/nix/store/def-vfkit-0.6.1/bin/vfkit"


def _config(**extra):
    return from_dict({"backend": "vfkit", "stateDir": "/var/lib/virby",
                      "runtimeDir": "/var/run/virby", "hypervisor": VFKIT, **extra})


def _render(user: str | None = "_virby", **kw) -> dict:
    data = launchd.render_plist(CONFIG_PATH, _config(), virby_exe=VIRBY, user=user, **kw)
    assert data.startswith(b"<?xml")
    return plistlib.loads(data)


def test_every_key() -> None:
    job = _render()
    assert job == {
        "Label": "org.nixos.virby",
        "ProgramArguments": [VIRBY, "run", "--config", CONFIG_PATH],
        "RunAtLoad": True,
        "KeepAlive": True,
        "ExitTimeOut": watchers.LONGEST_GRACEFUL + 10,
        "WorkingDirectory": "/var/lib/virby",
        "StandardOutPath": "/var/lib/virby/logs/launchd.out",
        "StandardErrorPath": "/var/lib/virby/logs/launchd.err",
        "ProcessType": "Standard",
        "EnvironmentVariables": {"PATH": ":".join([
            "/nix/store/abc-virby-0.1.0/bin",
            "/nix/store/def-vfkit-0.6.1/bin",
            "/run/current-system/sw/bin",
            "/nix/var/nix/profiles/default/bin",
            "/usr/bin", "/bin", "/usr/sbin", "/sbin",
        ])},
        "SoftResourceLimits": {"NumberOfFiles": 4096},
        "UserName": "_virby",
    }


def test_exit_timeout_outlasts_the_slowest_watcher() -> None:
    job = _render()
    # The vm watcher's clean guest shutdown is the longest; launchd must not cut it short.
    assert job["ExitTimeOut"] >= watchers.BY_NAME["vm"].graceful_timeout + 10
    assert job["ExitTimeOut"] > 20  # launchd's default, too short for a clean guest shutdown


def test_no_user_means_root_and_no_user_name_key() -> None:
    assert "UserName" not in _render(user=None)


def test_extra_path_comes_first_and_duplicates_collapse() -> None:
    job = _render(extra_path=["/opt/tools/bin", "/usr/bin"])
    dirs = job["EnvironmentVariables"]["PATH"].split(":")
    assert dirs[0] == "/opt/tools/bin"
    assert dirs.count("/usr/bin") == 1


def test_bare_hypervisor_name_adds_no_directory() -> None:
    cfg = from_dict({"backend": "vfkit", "stateDir": "/var/lib/virby",
                     "runtimeDir": "/var/run/virby"})
    assert cfg.hypervisor == "vfkit"
    job = plistlib.loads(launchd.render_plist(CONFIG_PATH, cfg, virby_exe=VIRBY, user=None))
    assert job["EnvironmentVariables"]["PATH"].split(":")[:2] == [
        "/nix/store/abc-virby-0.1.0/bin", "/run/current-system/sw/bin"]


def test_logs_follow_the_state_dir() -> None:
    cfg = from_dict({"backend": "vfkit", "stateDir": "/Users/me/.virby",
                     "runtimeDir": "/tmp/virby-me"})
    job = plistlib.loads(launchd.render_plist("/x.json", cfg, virby_exe=VIRBY, user=None))
    assert job["StandardOutPath"] == "/Users/me/.virby/logs/launchd.out"
    assert job["StandardErrorPath"] == "/Users/me/.virby/logs/launchd.err"
    assert job["WorkingDirectory"] == "/Users/me/.virby"
    assert job["ProgramArguments"][-1] == "/x.json"


def test_each_builder_is_its_own_job() -> None:
    x86 = launchd.render_plist("/etc/virby/builders/virby-x86.json", _config(name="virby-x86"),
                               virby_exe=VIRBY, user="_virby")
    job = plistlib.loads(x86)
    assert job["Label"] == "org.nixos.virby.virby-x86"
    assert job["ProgramArguments"] == [VIRBY, "run", "--config", "/etc/virby/builders/virby-x86.json"]
