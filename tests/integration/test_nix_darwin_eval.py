"""nix/module.nix evaluated inside a darwin system, with only packages stubbed
(tests/nix/stub-pkgs.nix), and everything it writes forced: the launchd daemon, each /etc file
(virby/config.json included), nix.buildMachines, the users, the activation lines, the assertions.

Two systems run the same harness (tests/nix/eval-darwin.nix):
* "stand-in": tests/nix/darwin-standin.nix, a hand-written module system and nix-darwin option
  interface. Always runs (CI included): it needs only Debian's nix-instantiate.
* "nix-darwin": the real nix-darwin and nixpkgs.lib, when VIRBY_NIX_DARWIN and VIRBY_NIXPKGS_LIB
  name extracted checkouts (CI cannot fetch them; docs/macos.md records the commits evaluated).
  With VIRBY_DETERMINATE (a DeterminateSystems/determinate checkout) its real nix-darwin module
  too; else the Determinate cases run on the stand-in only (tests/nix/determinate-standin.nix).

And three Nixes a Mac may run (harness argument `nix`): nix-darwin managing Nix (its default),
Nix left unmanaged (`nix.enable = false`), and Determinate's nix-darwin module.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.require import given_inputs, require, unavailable
from virby.core.config import from_dict
from virby.supervisor import launchd

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "nix" / "eval-darwin.nix"
LOCK = REPO / "tests" / "nix" / "guest.lock.sample.json"
NIX = require("nix-instantiate", "apt-get install nix-bin", module=True)

REAL_LOCK = REPO / "image" / "guest.lock.json"
# CI cannot fetch the upstream checkouts: without them the real nix-darwin cases are reported
# as skipped with this reason (locally and under CI alike), the stand-in ones run.
_real, REAL_MARKS = given_inputs("VIRBY_NIX_DARWIN", "VIRBY_NIXPKGS_LIB",
                                 hint="name extracted nix-darwin and nixpkgs.lib trees to "
                                      "evaluate in real nix-darwin")
REAL = {"nixDarwin": _real[0], "nixpkgsLib": _real[1]}
DETERMINATE = os.environ.get("VIRBY_DETERMINATE")
# What tests/nix/stub-pkgs.nix models: nixpkgs' vmTools.debDistros urlPrefix is
# "<snapshot service>/archive/debian/<ts>", so the module must find this base in it.
STUB_SNAPSHOT = "https://snapshot.invalid"
NIXES = ["nix-darwin", "unmanaged", "determinate"]
HAVE_REAL = not REAL_MARKS
SYSTEMS: list[Any] = ["stand-in", pytest.param("nix-darwin", marks=REAL_MARKS)]


class NixError(Exception):
    pass


def darwin_eval(tmp: Path, system: str, settings: dict[str, Any] | None = None,
                what: str = "all", *, nix: str = "nix-darwin", alone: bool = False,
                extra_module: Path | None = None) -> dict[str, Any]:
    args = ["--argstr", "settings", json.dumps(settings or {}), "--argstr", "what", what,
            "--argstr", "nix", nix, "--arg", "alone", "true" if alone else "false"]
    if extra_module is not None:
        args += ["--arg", "extraModule", str(extra_module)]
    if system == "nix-darwin":
        args += ["--arg", "nixDarwin", str(REAL["nixDarwin"]),
                 "--arg", "nixpkgsLib", str(REAL["nixpkgsLib"])]
        if nix == "determinate":
            if not DETERMINATE:
                unavailable("set VIRBY_DETERMINATE to a DeterminateSystems/determinate checkout "
                            "to evaluate with its real nix-darwin module")
            args += ["--arg", "determinate", DETERMINATE]
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


def snapshot_url(base: str, lock_url: str) -> str:
    """A lock's snapshot://<archive>/<ts>/<path> on the snapshot service at `base`."""
    archive, rest = re.fullmatch(r"snapshot://([a-z-]+)/(.+)", lock_url).groups()  # type: ignore[union-attr]
    return f"{base}/archive/{archive}/{rest}"


def lock_packages(lock: Path) -> list[dict[str, Any]]:
    doc = json.loads(lock.read_text())
    return [p for p in doc["arches"]["aarch64"]["packages"] if "nix" in p["variants"]]


def test_guest_packages_are_fixed_output_downloads_named_by_the_lock(default) -> None:
    wanted = lock_packages(LOCK)
    debs = default["guestDebs"]
    assert [d["path"].split("-", 1)[1] for d in debs] == [f"{p['name']}_arm64.deb" for p in wanted]
    assert [d["outputHash"] for d in debs] == [p["sha256"] for p in wanted]
    # No host is written in the repository: the main archive through nixpkgs' own mirror list,
    # the snapshot service through the base nixpkgs' vmTools.debDistros use, and a security
    # update (the sample's kernel) also from the main pool, where a point release puts it.
    assert default["snapshotBase"] == STUB_SNAPSHOT
    want = []
    for p in wanted:
        main, snap = p["urls"]
        if main.startswith("mirror://debian-security/pool/updates/"):
            main = "mirror://debian/pool/" + main.removeprefix("mirror://debian-security/pool/updates/")
        want.append([main, snapshot_url(STUB_SNAPSHOT, snap)])
    assert [d["urls"] for d in debs] == want


def test_a_security_mirror_override_comes_first(system: str, tmp_path: Path) -> None:
    out = darwin_eval(tmp_path, system, {"debianSecurityMirror": "http://security.invalid/ds/",
                                         "debianSnapshot": "http://snap.invalid/"})
    kernel = next(d for d in out["guestDebs"] if "linux-image" in d["path"])
    path = "pool/updates/main/l/linux-signed-arm64/linux-image-6.12.57+deb13-cloud-arm64_6.12.57-1_arm64.deb"
    assert kernel["urls"] == [
        f"http://security.invalid/ds/{path}",
        "mirror://debian/" + path.replace("pool/updates/", "pool/", 1),
        f"http://snap.invalid/archive/debian-security/20261201T000000Z/{path}"]
    busybox = out["guestDebs"][0]
    assert busybox["urls"][1].startswith("http://snap.invalid/archive/debian/20261201T000000Z/")
    assert out["failedAssertions"] == [] and out["warnings"] == []


MACHINES = "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel - -\n"


def test_every_etc_file_the_module_writes(default) -> None:
    # nix/machines is nix-darwin's, from nix.buildMachines (the stand-in writes it as it does).
    assert set(default["etc"]) == {"virby/config.json", "ssh/ssh_config.d/100-virby-vm.conf",
                                   "nix/machines"}
    ssh = default["etc"]["ssh/ssh_config.d/100-virby-vm.conf"]["text"]
    assert ssh.startswith("Host virby-vm\n  HostName 127.0.0.1\n  Port 31222\n")
    assert default["etc"]["nix/machines"]["text"] == MACHINES


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
    # kvm is advertised because the option asks; activation warns on a Mac that cannot nest.
    assert "machdep.cpu.brand_string" in out["activation"] and "/usr/bin/sw_vers" in out["activation"]


def test_no_nested_check_without_nested_virtualization(default) -> None:
    assert "machdep.cpu.brand_string" not in default["activation"]
    assert "kvm" not in default["buildMachines"][0]["supportedFeatures"]


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
        for key in ("buildMachines", "guest", "guestDebs", "activation", "failedAssertions",
                    "machines", "buildersUseSubstitutes", "distributedBuilds"):
            assert real[key] == standin[key], key
        assert real["etc"] == standin["etc"]
        assert non_null(real["launchd"]) == non_null(standin["launchd"])

    @pytest.mark.parametrize("system", [s for s in SYSTEMS if s != "stand-in"])
    @pytest.mark.parametrize("nix", NIXES)
    def test_stand_in_agrees_on_a_first_day(tmp_path: Path, system: str, nix: str) -> None:
        real = darwin_eval(tmp_path, system, nix=nix, alone=True)
        standin = darwin_eval(tmp_path, "stand-in", nix=nix, alone=True)
        for key in ("machines", "guestDebs", "failedAssertions", "nixEnable", "determinateNix",
                    "buildersUseSubstitutes", "distributedBuilds"):
            assert real[key] == standin[key], key


# -- A Mac's first day: `services.virby.enable = true;` alone, whatever Nix the Mac runs ---------

@pytest.mark.parametrize("nix", NIXES)
def test_enable_alone_passes_the_first_switch(system: str, tmp_path: Path, nix: str) -> None:
    out = darwin_eval(tmp_path, system, nix=nix, alone=True)
    assert out["failedAssertions"] == [] and out["warnings"] == []
    # The builder is registered where that Nix reads it: /etc/nix/machines, whoever writes it.
    assert out["machines"] == MACHINES
    virby_vm = {"hostName": "virby-vm", "protocol": "ssh-ng", "systems": ["aarch64-linux"],
                "maxJobs": 8, "supportedFeatures": ["benchmark", "big-parallel"]}
    if nix == "nix-darwin":
        assert out["nixEnable"] is True and out["determinateNix"] is None
        assert [{k: m[k] for k in virby_vm} for m in out["buildMachines"]] == [virby_vm]
        assert out["distributedBuilds"] is True and out["buildersUseSubstitutes"] is True
    elif nix == "unmanaged":  # nix-darwin writes no nix/machines: the module does
        assert out["nixEnable"] is False and out["buildMachines"] is None
        assert out["determinateNix"] is None
    else:  # detected, with no setting: Determinate's module writes nix/machines from its list
        assert out["nixEnable"] is False and out["buildMachines"] is None
        assert out["determinateNix"] == {"enable": True, "distributedBuilds": True,
                                         "buildMachines": [virby_vm],
                                         "buildersUseSubstitutes": True}
        assert "builders-use-substitutes = true" in out["nixCustomConf"].splitlines()


@pytest.mark.parametrize("nix", NIXES)
def test_every_guest_package_has_a_fallback_url(system: str, tmp_path: Path, nix: str) -> None:
    """The repository's own lock: each package resolves (as nixpkgs' fetchurl resolves
    mirror://) to more than one URL, one of them the lock's snapshot URL on the snapshot service
    nixpkgs knows, so neither the pool dropping a version nor the security archive (which
    nixpkgs has no mirror list for) stops the first switch."""
    out = darwin_eval(tmp_path, system, nix=nix, alone=True)
    assert out["snapshotBase"] == STUB_SNAPSHOT
    wanted = lock_packages(REAL_LOCK)
    debs = out["guestDebs"]
    assert [d["outputHash"] for d in debs] == [p["sha256"] for p in wanted]
    for p, d in zip(wanted, debs, strict=True):
        [snap] = [u for u in p["urls"] if u.startswith("snapshot://")]
        assert len(d["urls"]) > 1 and len(d["resolved"]) > 1, p["name"]
        assert snapshot_url(STUB_SNAPSHOT, snap) in d["resolved"], p["name"]
        assert not any(u.startswith(("mirror://", "snapshot://")) for u in d["resolved"]), p["name"]
    security = [p["name"] for p in wanted if p["urls"][0].startswith("mirror://debian-security/")]
    assert "libzstd1" in security and any(n.startswith("linux-image-") for n in security)


def example_module(doc: Path) -> str:
    """The nix-darwin module the install example gives after virby.darwinModules.default."""
    text = doc.read_text()
    [block] = [b for b in re.findall(r"```nix\n(.*?)```", text, re.S) if "darwinSystem" in b][:1]
    m = re.search(r"virby\.darwinModules\.default\n( *)(\{\n.*?\n\1\})", block, re.S)
    assert m, f"{doc.name}: no module after virby.darwinModules.default"
    flake_inputs = set(re.findall(r"^    ([a-z-]+)(?:\.url)? = ", (REPO / "flake.nix").read_text(), re.M))
    for follows in re.findall(r"virby\.inputs\.([a-z-]+)\.follows", block):
        assert follows in flake_inputs, f"{doc.name}: virby has no input {follows}"
    assert re.search(r'virby\.url = "(path|git\+file|github):', block)
    return m.group(2)


@pytest.mark.parametrize("doc", ["README.md", "docs/macos.md"])
def test_the_install_example_evaluates(system: str, tmp_path: Path, doc: str) -> None:
    module = tmp_path / "example.nix"
    module.write_text(example_module(REPO / doc))
    out = darwin_eval(tmp_path, system, alone=True, extra_module=module)
    assert out["failedAssertions"] == [] and out["machines"] == MACHINES
