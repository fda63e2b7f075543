"""Two builders side by side, for real: an aarch64 builder (the Mac's guest, emulated here) and
an x86_64 builder, each its own `virby run` with its own port, alias, keys and idle policy. The
host's Nix (`--max-jobs 0`) gets both from `virby nix-machines --config DIR` and sends each
derivation to the builder of its system; both builds run cold (both VMs stopped: the build's
own SSH connection boots each), then warm.

The derivation uses only builtins, /proc and the guest's /bin/uname, so its output records the
machine (hostname), the kernel, the boot and the CPU it was built on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testing.harness import Instance
from testing.nixhost import GUEST_HOSTNAMES
from tests.require import require

pytestmark = pytest.mark.e2e

NIX_CONFIG = "\n".join(["build-users-group =", "substituters =", "experimental-features = nix-command"])

BOTH_NIX = """\
{ nonce }:
let
  where = system: derivation {
    name = "virby-${system}-${builtins.substring 0 8 nonce}";
    inherit system nonce;
    builder = "/bin/sh";
    args = [ "-c" ''
      read -r h < /proc/sys/kernel/hostname
      read -r k < /proc/sys/kernel/osrelease
      read -r b < /proc/sys/kernel/random/boot_id
      echo "$h $k $b $(uname -m)" > "$out"
    '' ];
  };
in [ (where "aarch64-linux") (where "x86_64-linux") ]
"""

BUILD_TIMEOUT = 600.0  # two cold boots at once on 2 cores, one of them an emulated arm64


@pytest.fixture(scope="module", autouse=True)
def host_nix() -> None:
    require("nix-build", "apt-get install -y --no-install-recommends nix-bin")


@pytest.fixture
def builders(guest_aarch64_nix_dir: Path, guest_nix_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """A builders directory with both configs; both arbiters running, both VMs stopped."""
    arm = Instance(guest_dir=guest_aarch64_nix_dir, name="virby-arm", arch="aarch64", memory=1024,
                   onDemand={"pauseAfter": 300, "stopAfter": 900})
    x86 = Instance(guest_dir=guest_nix_dir, name="virby-x86", arch="x86_64", memory=512,
                   onDemand={"pauseAfter": 600, "stopAfter": 1200})
    try:
        d = tmp_path / "builders"
        d.mkdir()
        for inst in (arm, x86):
            inst.start()
            shutil.copy(inst.config_path, d / f"{inst.config.name}.json")
        yield d
    finally:
        arm.close()
        x86.close()


def virby(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "virby.supervisor.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"virby {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_nix_sends_each_system_to_its_builder_cold_then_warm(
        builders: Path, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    machines = virby("nix-machines", "--config", str(builders)).splitlines()
    assert [m.split()[:2] for m in machines] == [["ssh-ng://virby-arm", "aarch64-linux"],
                                                 ["ssh-ng://virby-x86", "x86_64-linux"]]
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(virby("ssh-config", "--config", str(builders)))
    status = json.loads(virby("status", "--json", "--config", str(builders)))["builders"]
    assert {name: st["vm"]["state"] for name, st in status.items()} == {
        "virby-arm": "stopped", "virby-x86": "stopped"}

    expr = tmp_path / "both.nix"
    expr.write_text(BOTH_NIX)
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "NIX_SSHOPTS": f"-F {ssh_config}"}
    env.pop("NIX_REMOTE", None)
    outputs: list[str] = []

    def build() -> tuple[list[list[str]], float]:
        t0 = time.monotonic()
        proc = subprocess.run(["nix-build", str(expr), "--no-out-link", "--argstr", "nonce",
                               uuid.uuid4().hex, "--max-jobs", "0", "--builders", "\n".join(machines)],
                              env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        took = time.monotonic() - t0
        assert proc.returncode == 0, f"nix-build exited {proc.returncode}:\n{proc.stderr}"
        paths = proc.stdout.split()
        outputs.extend(paths)
        assert "on 'ssh-ng://virby-arm'" in proc.stderr and "on 'ssh-ng://virby-x86'" in proc.stderr
        return [Path(p).read_text().split() for p in paths], took

    try:
        cold, cold_s = build()
        warm, warm_s = build()
        boot_ids = {}
        for name in ("virby-arm", "virby-x86"):
            out = subprocess.run(["ssh", "-F", str(ssh_config), name, "cat /proc/sys/kernel/random/boot_id"],
                                 capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 0, out.stderr
            boot_ids[name] = out.stdout.strip()
        for arm, x86 in (cold, warm):
            # hostname, kernel, boot id, CPU: the aarch64 derivation ran in the arm64 guest
            assert arm[0] in GUEST_HOSTNAMES and arm[1].endswith("-cloud-arm64") and arm[3] == "aarch64", arm
            assert arm[2] == boot_ids["virby-arm"]
            assert x86[0] in GUEST_HOSTNAMES and x86[1].endswith("-cloud-amd64") and x86[3] == "x86_64", x86
            assert x86[2] == boot_ids["virby-x86"]
        status = json.loads(virby("status", "--json", "--config", str(builders)))["builders"]
        assert {name: st["vm"]["boots"] for name, st in status.items()} == {"virby-arm": 1, "virby-x86": 1}
    finally:
        for path in outputs:
            subprocess.run(["nix-store", "--delete", path], env=env, capture_output=True, check=False)
    record_property("cold_both_s", round(cold_s, 2))
    record_property("warm_both_s", round(warm_s, 2))
    print(f"\nboth builders: cold {cold_s:.1f}s, warm {warm_s:.1f}s")
