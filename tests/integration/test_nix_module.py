"""The Nix side: every .nix file parses, and nix/lib.nix (what the nix-darwin module writes)
produces configs that core/config.py loads with the same values, the build machine and
ssh_config a user expects, the same launchd job as supervisor/launchd.py, and refuses bad
options. Runs Debian's `nix-instantiate` (nix-bin); no nixpkgs and no store writes needed.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.require import require
from virby.core.config import from_dict
from virby.supervisor import launchd, sshconfig

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "nix" / "lib.nix"
pytestmark = pytest.mark.integration
NIX = require("nix-instantiate", "apt-get install nix-bin", module=True)


def _env(tmp: Path) -> dict[str, str]:
    # Debian's nix wants a build group and substituters it cannot reach; evaluation needs none.
    return {**os.environ, "NIX_CONFIG": "build-users-group =\nsubstituters =\n",
            "HOME": str(tmp)}


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory) -> dict[str, str]:
    return _env(tmp_path_factory.mktemp("nixhome"))


def nix_eval(env: dict[str, str], opts: dict[str, Any], attr: str) -> Any:
    proc = subprocess.run(
        [NIX, "--eval", "--strict", "--json", "--argstr", "opts", json.dumps(opts),
         "-E", f"{{ opts }}: (import {LIB} (builtins.fromJSON opts)).{attr}"],
        capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    return json.loads(proc.stdout)


def nix_eval_expr(env: dict[str, str], expr: str) -> Any:
    proc = subprocess.run([NIX, "--eval", "--strict", "--json", "-E", expr],
                          capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    return json.loads(proc.stdout)


class NixError(Exception):
    pass


def test_every_nix_file_parses(nix_env) -> None:
    files = sorted(p for p in REPO.rglob("*.nix") if ".git" not in p.parts)
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"flake.nix", "nix/lib.nix", "nix/module.nix", "nix/package.nix",
            "image/nixos/guest.nix", "image/nixos/default.nix"} <= names
    for path in files:
        proc = subprocess.run([NIX, "--parse", str(path)], capture_output=True, text=True,
                              env=nix_env, timeout=60)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


GUEST = {"kernel": "/nix/store/aaa-linux-6.12/Image",
         "initrd": "/nix/store/bbb-initrd-linux/initrd",
         "cmdline": "init=/nix/store/ccc-nixos-system-virby-vm/init console=hvc0 panic=5",
         "disk": "/nix/store/ddd-squashfs.img"}
VFKIT = "/nix/store/eee-vfkit-0.6.1/bin/vfkit"
VIRBY = "/nix/store/fff-virby-0.1.0/bin/virby"
GiB = 1 << 30

# (options as the module passes them, what config.py must load from the JSON)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {
        "backend": "vfkit", "port": 31222, "cores": 8, "memory": 6144, "diskSize": 100 * GiB,
        # on demand by default: idle memory goes back to macOS
        "on_demand": (True, 60.0, 180 * 60.0), "rosetta": False, "nested": False,
        "stateDir": "/var/lib/virby", "runtimeDir": "/var/lib/virby/run", "shared": {},
    }),
    "rosetta": ({"rosetta": True, "guest": GUEST, "hypervisor": VFKIT}, {
        "rosetta": True, "guest": GUEST, "hypervisor": VFKIT,
    }),
    "nested": ({"nestedVirtualization": True, "cores": 4}, {"nested": True, "cores": 4}),
    "on-demand off": ({"onDemand": {"enable": False, "ttl": 30}}, {
        "on_demand": (False, 60.0, 1800.0),
    }),
    "on-demand on, explicit times": (
        {"onDemand": {"enable": True, "ttl": 30, "pauseAfter": 120, "stopAfter": 900}},
        {"on_demand": (True, 120.0, 900.0)}),
    "never stop, never pause": (
        {"onDemand": {"enable": True, "pauseAfter": None, "stopAfter": None}},
        {"on_demand": (True, None, None)}),
    "shared dirs": ({"sharedDirectories": {"src": "/Users/me/src", "nix-cache": "/opt/cache"}},
                    {"shared": {"src": "/Users/me/src", "nix-cache": "/opt/cache"}}),
    "memory as string": ({"memory": "8GiB", "diskSize": "512G", "port": 40022},
                         {"memory": 8192, "diskSize": 512 * GiB, "port": 40022}),
    "memory in MiB string": ({"memory": "3072 MiB", "diskSize": 64 * GiB},
                             {"memory": 3072, "diskSize": 64 * GiB}),
    "qemu backend": ({"backend": "qemu", "hypervisor": "/nix/store/q-qemu/bin/qemu-system-aarch64"},
                     {"backend": "qemu", "accel": "hvf"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_json_loads_in_config_py_with_the_same_values(nix_env, name: str) -> None:
    opts, want = CASES[name]
    doc = nix_eval(nix_env, opts, "config")
    cfg = from_dict(doc, source=None)
    got = {
        "backend": cfg.backend, "port": cfg.port, "cores": cfg.cores, "memory": cfg.memory,
        "diskSize": cfg.diskSize,
        "on_demand": (cfg.onDemand.enable, cfg.onDemand.pauseAfter, cfg.onDemand.stopAfter),
        "rosetta": cfg.rosetta, "nested": cfg.nestedVirtualization, "stateDir": cfg.stateDir,
        "runtimeDir": cfg.runtimeDir, "shared": cfg.sharedDirectories, "accel": cfg.accel,
        "hypervisor": cfg.hypervisor,
        "guest": {"kernel": cfg.guest.kernel, "initrd": cfg.guest.initrd,
                  "cmdline": cfg.guest.cmdline, "disk": cfg.guest.disk},
    }
    assert {k: got[k] for k in want} == want
    assert cfg.sshUser == "builder"


def test_build_machine_defaults(nix_env) -> None:
    assert nix_eval(nix_env, {}, "buildMachine") == {
        "hostName": "virby-vm", "protocol": "ssh-ng", "maxJobs": 8, "speedFactor": 1,
        "systems": ["aarch64-linux"], "supportedFeatures": ["benchmark", "big-parallel"],
        "mandatoryFeatures": [],
    }


def test_build_machine_follows_rosetta_nested_cores_and_speed(nix_env) -> None:
    m = nix_eval(nix_env, {"rosetta": True, "nestedVirtualization": True, "cores": 6,
                           "speedFactor": 3}, "buildMachine")
    assert m["systems"] == ["aarch64-linux", "x86_64-linux"]
    # kvm and nixos-test only with nested virtualization
    assert m["supportedFeatures"] == ["benchmark", "big-parallel", "kvm", "nixos-test"]
    assert (m["maxJobs"], m["speedFactor"]) == (6, 3)
    assert "kvm" not in nix_eval(nix_env, {"rosetta": True}, "buildMachine")["supportedFeatures"]


def test_machines_text_is_nix_darwins_format(nix_env) -> None:
    assert nix_eval(nix_env, {}, "machinesText") == (
        "ssh-ng://virby-vm aarch64-linux - 8 1 benchmark,big-parallel - -\n")
    assert nix_eval(nix_env, {"rosetta": True, "nestedVirtualization": True, "cores": 4,
                              "speedFactor": 2}, "machinesText") == (
        "ssh-ng://virby-vm aarch64-linux,x86_64-linux - 4 2 "
        "benchmark,big-parallel,kvm,nixos-test - -\n")


SNAP = "https://snapshot.invalid/archive/debian/20260105T082626Z"


@pytest.mark.parametrize(("distros", "base"), [
    # nixpkgs' vmTools.debDistros: Debian's urlPrefix is "<base>/archive/debian/<timestamp>".
    ({"debian13x86_64": {"name": "debian-13.2-trixie-amd64", "urlPrefix": SNAP}},
     "https://snapshot.invalid"),
    # Another layout sorting first is passed over; a trailing slash is fine.
    ({"aaUbuntu": {"urlPrefix": "https://u.invalid/ubuntu/20260101T000000Z"},
      "debian12x86_64": {"urlPrefix": "https://s.invalid/deb/archive/debian/20260105T082626Z/"}},
     "https://s.invalid/deb"),
    # Old nixpkgs (urlPrefix = mirror://debian) or none at all: no snapshot base.
    ({"debian40x86_64": {"urlPrefix": "mirror://debian"}}, None),
    ({}, None),
])
def test_snapshot_base_from_vmtools_deb_distros(nix_env, distros, base) -> None:
    expr = f"(import {LIB} {{ }}).debian.snapshotBase (builtins.fromJSON ''{json.dumps(distros)}'')"
    assert nix_eval_expr(nix_env, expr) == base


def test_debian_urls_for_main_and_security_packages(nix_env) -> None:
    ts = "20261201T231802Z"
    main = {"urls": ["mirror://debian/pool/main/b/busybox/b.deb",
                     f"snapshot://debian/{ts}/pool/main/b/busybox/b.deb"]}
    sec = {"urls": ["mirror://debian-security/pool/updates/main/k/krb5/k.deb",
                    f"snapshot://debian-security/{ts}/pool/updates/main/k/krb5/k.deb"]}

    def urls(pkg, **kw) -> list[str]:
        args = "{ " + " ".join(f'{k} = "{v}";' for k, v in kw.items()) + " }"
        return nix_eval_expr(nix_env, f"(import {LIB} {{ }}).debian.urls {args} "
                                      f"(builtins.fromJSON ''{json.dumps(pkg)}'')")

    assert urls(main, snapshotBase="https://s.invalid/") == [
        main["urls"][0], f"https://s.invalid/archive/debian/{ts}/pool/main/b/busybox/b.deb"]
    assert urls(sec, snapshotBase="https://s.invalid") == [
        "mirror://debian/pool/main/k/krb5/k.deb",  # where the next point release puts it
        f"https://s.invalid/archive/debian-security/{ts}/pool/updates/main/k/krb5/k.deb"]
    assert urls(sec, securityMirror="http://m.invalid/ds/", snapshotBase="https://s.invalid")[0] == (
        "http://m.invalid/ds/pool/updates/main/k/krb5/k.deb")
    assert urls(main) == [main["urls"][0]]  # no snapshot base: the main archive only


@pytest.mark.parametrize(("chip", "macos", "warns"), [
    ("Apple M1", "15.1", True),
    ("Apple M2 Max", "15.0", True),
    ("Apple M3 Pro", "14.6.1", True),
    ("Apple M3", "15.0", False),
    ("Apple M4 Max", "26.0", False),
    ("", "", True),  # sysctl or sw_vers failed: say so rather than stay silent
])
def test_nested_virtualization_check_at_activation(nix_env, tmp_path: Path, chip: str, macos: str,
                                                    warns: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, out in (("sysctl", chip), ("sw_vers", macos)):
        (bin_dir / name).write_text(f"#!/bin/sh\n[ -n '{out}' ] || exit 1\necho '{out}'\n")
        (bin_dir / name).chmod(0o755)
    script = nix_eval_expr(nix_env, f'(import {LIB} {{ }}).nestedCheck '
                                    f'{{ sysctl = "{bin_dir}/sysctl"; swVers = "{bin_dir}/sw_vers"; }}')
    proc = subprocess.run(["sh", "-euc", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert ("cannot nest virtualization" in proc.stderr) == warns, proc.stderr
    if warns and chip:
        assert f"({chip}, macOS {macos})" in proc.stderr


def test_ssh_config_text(nix_env) -> None:
    assert nix_eval(nix_env, {"port": 31222}, "sshConfig") == (
        "Host virby-vm\n"
        "  HostName 127.0.0.1\n"
        "  Port 31222\n"
        "  User builder\n"
        "  IdentityFile /var/lib/virby/ssh_user_ed25519_key\n"
        "  IdentitiesOnly yes\n"
        "  GlobalKnownHostsFile /var/lib/virby/ssh_known_hosts\n"
        "  UserKnownHostsFile /dev/null\n"
        "  HostKeyAlias virby-vm-key\n"
        "  StrictHostKeyChecking yes\n"
        "  ConnectTimeout 75\n"
        "  BatchMode yes\n"
        "Match originalhost virby-vm localuser root,_virby\n"
        "  ControlMaster auto\n"
        "  ControlPath /var/lib/virby/run/ssh-%C\n"
        "  ControlPersist 30\n"
    )


def test_ssh_config_matches_virby_ssh_config(nix_env) -> None:
    opts = {"port": 40022, "virbyExe": VIRBY, "hypervisor": VFKIT, "guest": GUEST}
    cfg = from_dict(nix_eval(nix_env, opts, "config"))
    assert nix_eval(nix_env, opts, "sshConfig") == sshconfig.ssh_config_text(
        cfg, mux_users=("root", "_virby"))


def test_ssh_config_with_user_ssh_uses_the_group_copy(nix_env) -> None:
    text = nix_eval(nix_env, {"allowUserSsh": True, "port": 40000}, "sshConfig")
    assert "  IdentityFile /var/lib/virby/ssh_user_ed25519_key.shared\n" in text
    assert "  Port 40000\n" in text


def test_launchd_job_matches_render_plist(nix_env) -> None:
    opts = {"virbyExe": VIRBY, "hypervisor": VFKIT, "guest": GUEST}
    job = nix_eval(nix_env, opts, "launchdJob")
    cfg = from_dict(nix_eval(nix_env, opts, "config"))
    rendered = plistlib.loads(launchd.render_plist(
        "/etc/virby/config.json", cfg, virby_exe=VIRBY, user="_virby"))
    assert job == rendered


@pytest.mark.parametrize(("opts", "message"), [
    ({"port": 80}, "services.virby.port: got 80, expected a port from 1024 to 65535"),
    ({"port": 65536}, "services.virby.port: got 65536"),
    ({"memory": "lots"}, 'services.virby.memory: got "lots", expected MiB as a number'),
    ({"memory": 512}, "services.virby.memory: got 512, expected at least 1024 MiB"),
    ({"memory": "6GB"}, 'services.virby.memory: got "6GB"'),
    ({"diskSize": "big"}, 'services.virby.diskSize: got "big"'),
    ({"diskSize": "512M"}, 'services.virby.diskSize: got "512M", expected 1GiB to 16TiB'),
    ({"onDemand": {"pauseAfter": 600, "stopAfter": 300}},
     "services.virby.onDemand.stopAfter: got 300, expected more than onDemand.pauseAfter"),
    ({"onDemand": {"ttl": 1}},  # ttl 1 min = 60 s, not more than pauseAfter's 60 s
     "services.virby.onDemand.stopAfter: got 60, expected more than"),
    ({"sharedDirectories": {"src": "relative/path"}},
     'services.virby.sharedDirectories.src: got "relative/path", expected an absolute path'),
    ({"sharedDirectories": {"bad tag": "/x"}}, "services.virby.sharedDirectories.bad tag"),
    ({"backend": "krunkit"}, 'services.virby.backend: got "krunkit"'),
])
def test_bad_options_are_rejected_at_eval(nix_env, opts: dict[str, Any], message: str) -> None:
    errors = nix_eval(nix_env, opts, "errors")
    assert any(message in e for e in errors), errors
    # And the config itself refuses to exist, naming the same problem.
    with pytest.raises(NixError, match="virby: invalid options") as err:
        nix_eval(nix_env, opts, "config")
    assert message.split(":")[0] in str(err.value)


def test_good_options_have_no_errors(nix_env) -> None:
    for opts, _ in CASES.values():
        assert nix_eval(nix_env, opts, "errors") == []


def test_every_config_key_is_one_config_py_knows(nix_env) -> None:
    opts = {"guest": GUEST, "hypervisor": VFKIT, "backend": "qemu"}
    doc = nix_eval(nix_env, opts, "config")
    from virby.core import config as config_mod

    assert set(doc) <= config_mod._TOP_KEYS
    assert set(doc["onDemand"]) <= config_mod._ON_DEMAND_KEYS
    assert set(doc["guest"]) <= config_mod._GUEST_KEYS
