"""nix/module.nix evaluated inside a darwin system, with only packages stubbed
(tests/nix/stub-pkgs.nix), and everything it writes forced: the launchd daemon, each /etc file
(virby/config.json included), nix.buildMachines, the users, the activation lines, the assertions.

Two systems run the same harness (tests/nix/eval-darwin.nix):
* "stand-in": tests/nix/darwin-standin.nix, a hand-written module system and nix-darwin option
  interface. Always runs (CI included): it needs only Debian's nix-instantiate.
* "nix-darwin": the real nix-darwin and nixpkgs.lib, when VIRBY_NIX_DARWIN and VIRBY_NIXPKGS_LIB
  name extracted checkouts (CI cannot fetch them; docs/macos.md records the commits evaluated).
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virby.supervisor import launchd
from virby.supervisor.config import from_dict

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "nix" / "eval-darwin.nix"
LOCK = REPO / "tests" / "nix" / "guest.lock.sample.json"
_found = shutil.which("nix-instantiate")
if _found is None:
    if os.environ.get("CI"):
        raise RuntimeError("nix-instantiate is missing: install Debian's nix-bin for these tests")
    pytest.skip("nix-instantiate not installed (apt-get install nix-bin)", allow_module_level=True)
NIX: str = _found or ""

REAL = {"nixDarwin": os.environ.get("VIRBY_NIX_DARWIN"),
        "nixpkgsLib": os.environ.get("VIRBY_NIXPKGS_LIB")}
HAVE_REAL = all(REAL.values())
SYSTEMS: list[Any] = ["stand-in"]
if HAVE_REAL:
    SYSTEMS.append("nix-darwin")
elif not os.environ.get("CI"):
    SYSTEMS.append(pytest.param("nix-darwin", marks=pytest.mark.skip(
        reason="set VIRBY_NIX_DARWIN and VIRBY_NIXPKGS_LIB to extracted nix-darwin and "
               "nixpkgs.lib trees to evaluate in real nix-darwin")))


class NixError(Exception):
    pass


def darwin_eval(tmp: Path, system: str, settings: dict[str, Any] | None = None,
                what: str = "all") -> dict[str, Any]:
    args = ["--argstr", "settings", json.dumps(settings or {}), "--argstr", "what", what]
    if system == "nix-darwin":
        args += ["--arg", "nixDarwin", str(REAL["nixDarwin"]),
                 "--arg", "nixpkgsLib", str(REAL["nixpkgsLib"])]
    env = {**os.environ, "NIX_CONFIG": "build-users-group =\nsubstituters =\n", "HOME": str(tmp)}
    proc = subprocess.run([NIX, "--eval", "--strict", "--json", str(HARNESS), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["evaluatedIn"] == system
    return out


def non_null(value: Any) -> Any:
    """A launchd job as its plist has it: nix-darwin declares every key, unset ones null."""
    if isinstance(value, dict):
        return {k: non_null(v) for k, v in value.items() if v is not None}
    return value


@pytest.fixture(scope="module", params=SYSTEMS)
def system(request) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def default(system: str, tmp_path_factory) -> dict[str, Any]:
    return darwin_eval(tmp_path_factory.mktemp("nixhome"), system)


def test_config_json_is_the_locks_aarch64_guest_and_loads_in_config_py(default) -> None:
    doc = json.loads(default["etc"]["virby/config.json"]["text"])
    cfg = from_dict(doc, source=None)
    guest = default["guest"]
    assert guest.endswith("-virby-guest-aarch64-nix")
    assert (cfg.guest.kernel, cfg.guest.initrd) == (f"{guest}/vmlinuz", f"{guest}/initrd.img")
    assert cfg.guest.disk is None  # the store lives on the data disk
    assert cfg.guest.cmdline.split()[0] == "console=hvc0"
    assert "virby.net=dhcp" in cfg.guest.cmdline.split()  # vfkit's NAT: the guest asks DHCP
    assert cfg.backend == "vfkit" and cfg.hypervisor.endswith("-vfkit-0.6.1/bin/vfkit")
    assert default["etc"]["virby/config.json"]["source"].endswith("-etc-config.json")


def test_guest_packages_are_fixed_output_downloads_named_by_the_lock(default) -> None:
    lock = json.loads(LOCK.read_text())
    wanted = [p for p in lock["arches"]["aarch64"]["packages"] if "nix" in p["variants"]]
    debs = default["guestDebs"]
    assert [d["path"].split("-", 1)[1] for d in debs] == [f"{p['name']}_arm64.deb" for p in wanted]
    assert [d["outputHash"] for d in debs] == [p["sha256"] for p in wanted]
    # The main archive through nixpkgs' own mirror list; the security archive (the sample's
    # kernel) through the configured base URL. No host is written in the repository.
    assert [d["urls"] for d in debs] == [
        [f"http://security.invalid/debian-security/{p['path']}"] if "security" in p["urls"][0]
        else [f"mirror://debian/{p['path']}"] for p in wanted]


def test_a_lock_with_security_packages_needs_the_security_mirror(system: str, tmp_path: Path) -> None:
    out = darwin_eval(tmp_path, system, {"debianSecurityMirror": None}, what="assertions")
    [message] = out["failedAssertions"]
    assert message.startswith("services.virby.debianSecurityMirror: the guest lock takes "
                              "linux-image-6.12.57+deb13-cloud-arm64 from Debian's security archive")


def test_every_etc_file_the_module_writes(default, system: str) -> None:
    ours = {"virby/config.json", "ssh/ssh_config.d/100-virby-vm.conf"}
    # Real nix-darwin also writes nix/machines from nix.buildMachines.
    assert set(default["etc"]) == (ours | {"nix/machines"} if system == "nix-darwin" else ours)
    ssh = default["etc"]["ssh/ssh_config.d/100-virby-vm.conf"]["text"]
    assert ssh.startswith("Host virby-vm\n  HostName 127.0.0.1\n  Port 31222\n")
    if system == "nix-darwin":
        assert default["etc"]["nix/machines"]["text"] == (
            "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel - -\n")


def test_launchd_daemon_is_render_plist(default, system: str) -> None:
    job = non_null(default["launchd"])
    cfg = from_dict(json.loads(default["etc"]["virby/config.json"]["text"]), source=None)
    virby_exe = job["ProgramArguments"][0]
    want = plistlib.loads(launchd.render_plist("/etc/virby/config.json", cfg,
                                               virby_exe=virby_exe, user="_virby"))
    assert job == want
    if system == "nix-darwin":  # the plist nix-darwin installs in /Library/LaunchDaemons
        assert plistlib.loads(default["plist"].encode()) == want


def test_build_machine_and_users(default) -> None:
    assert default["distributedBuilds"] is True
    [m] = default["buildMachines"]
    assert {k: m[k] for k in ("hostName", "protocol", "systems", "maxJobs", "supportedFeatures")} == {
        "hostName": "virby-vm", "protocol": "ssh-ng", "systems": ["aarch64-linux"], "maxJobs": 8,
        "supportedFeatures": ["benchmark", "big-parallel"]}
    users = default["users"]
    assert {k: users["user"][k] for k in ("uid", "gid", "home", "shell", "isHidden", "createHome")} == {
        "uid": 348, "gid": 348, "home": "/var/lib/virby", "shell": "/usr/bin/false",
        "isHidden": True, "createHome": False}
    assert (users["group"]["gid"], users["group"]["name"]) == (348, "virby")
    assert "_virby" in users["knownUsers"] and "virby" in users["knownGroups"]
    assert default["failedAssertions"] == [] and default["warnings"] == []


def test_state_dirs_exist_before_launchd_loads_the_daemon(default, system: str) -> None:
    """Regression: the dirs were made in postActivation, which nix-darwin runs after its launchd
    phase has loaded the daemon, so on a fresh Mac its first start found no WorkingDirectory
    and no log folder."""
    phase = default["launchdPhase"]
    made = phase.index("install -d -m 0750 -o _virby -g virby /var/lib/virby /var/lib/virby/logs")
    if system == "nix-darwin":
        assert made < phase.index("launchctl load -w '/Library/LaunchDaemons/org.nixos.virby.plist'")
    assert "install -d" not in default["activation"]


def test_options_reach_every_output(system: str, tmp_path: Path) -> None:
    out = darwin_eval(tmp_path, system, {
        "rosetta": True, "nestedVirtualization": True, "allowUserSsh": True, "cores": 4,
        "onDemand": {"enable": True, "ttl": 30}, "memory": "8GiB", "port": 40022})
    cfg = from_dict(json.loads(out["etc"]["virby/config.json"]["text"]), source=None)
    assert (cfg.rosetta, cfg.memory, cfg.port, cfg.onDemand.stopAfter) == (True, 8192, 40022, 1800.0)
    [m] = out["buildMachines"]
    assert m["systems"] == ["aarch64-linux", "x86_64-linux"] and m["maxJobs"] == 4
    assert "kvm" in m["supportedFeatures"]
    assert "IdentityFile /var/lib/virby/ssh_user_ed25519_key.shared" in \
        out["etc"]["ssh/ssh_config.d/100-virby-vm.conf"]["text"]
    assert "install -m 0640 -o _virby -g virby" in out["activation"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"supportDeterminateNix": True}, "services.virby.supportDeterminateNix needs determinateNix.enable"),
    ({"onDemand": {"pauseAfter": 600, "stopAfter": 300}}, "services.virby.onDemand.stopAfter: got 300"),
    ({"port": 80}, "services.virby.port: got 80, expected a port from 1024 to 65535"),
])
def test_assertions_name_the_option(system: str, tmp_path: Path, settings, message: str) -> None:
    failed = darwin_eval(tmp_path, system, settings, what="assertions")["failedAssertions"]
    assert any(message in f for f in failed), failed


def test_a_misspelt_option_is_refused(system: str, tmp_path: Path) -> None:
    with pytest.raises(NixError, match=r"services\.virby\.rossetta' does not exist"):
        darwin_eval(tmp_path, system, {"rossetta": True})


# Under CI (no checkouts) this comparison is not collected at all: the stand-in runs alone.
if len(SYSTEMS) > 1:
    @pytest.mark.parametrize("system", [s for s in SYSTEMS if s != "stand-in"])
    def test_stand_in_agrees_with_real_nix_darwin(tmp_path: Path, system: str) -> None:
        real = darwin_eval(tmp_path, system, {"rosetta": True, "allowUserSsh": True})
        standin = darwin_eval(tmp_path, "stand-in", {"rosetta": True, "allowUserSsh": True})
        for key in ("buildMachines", "guest", "guestDebs", "activation", "failedAssertions"):
            assert real[key] == standin[key], key
        assert {k: v for k, v in real["etc"].items() if k != "nix/machines"} == standin["etc"]
        assert non_null(real["launchd"]) == non_null(standin["launchd"])
