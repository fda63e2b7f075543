"""The host's Nix, driven through Virby: `nix-build` of a tiny derivation with a fresh nonce
(never already in /nix/store), configured through the environment only (a single-user Nix, as
Debian ships it): no `nixbld` group, no binary cache, and `NIX_SSHOPTS=-F <absolute path>` (Nix
runs ssh from another working directory). Shared by tests/e2e/test_nix_build.py and `bench
nixbuild`.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

NIX_CONFIG = "\n".join([
    "build-users-group =",  # Debian's nix-bin creates no nixbld group
    "substituters =",  # loopback only: no binary cache
    "experimental-features = nix-command",
])

# Only builtins and /proc: the builder runs on any Linux, so a build that landed on the host
# would succeed and the checks on its output, not a missing tool, are what catch it.
WHERE_NIX = """\
{ nonce }:
derivation {
  name = "virby-where-${builtins.substring 0 8 nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  inherit nonce;
  args = [ "-c" ''
    read -r h < /proc/sys/kernel/hostname
    read -r k < /proc/sys/kernel/osrelease
    read -r b < /proc/sys/kernel/random/boot_id
    echo "$h $k $b" > "$out"
  '' ];
}
"""

# Where a build in the guest says it ran: the guest's name, or inside Nix's sandbox (a UTS
# namespace) "localhost", the name Nix gives every sandboxed build. The kernel and the boot id
# are what prove it was this guest.
GUEST_HOSTNAMES = ("virby-vm", "localhost")

BUILD_TIMEOUT = 180.0  # a cold build is about 5 s alone; 2 cores shared with other VM tests


@dataclass(frozen=True)
class Where:
    hostname: str
    kernel: str
    boot_id: str

    @classmethod
    def read(cls, path: Path) -> Where:
        hostname, kernel, boot_id = path.read_text().split()
        return cls(hostname, kernel, boot_id)


@dataclass(frozen=True)
class Build:
    proc: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def out(self) -> Path:
        assert self.proc.returncode == 0, f"nix-build exited {self.proc.returncode}:\n{self.proc.stderr}"
        return Path(self.proc.stdout.strip())


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def assert_built_in_guest(where: Where, guest_boot_id: str) -> None:
    """The output came from this Virby's VM, not from the host or another machine."""
    assert where.hostname in GUEST_HOSTNAMES, f"built on {where.hostname!r}, not in the guest"
    assert where.kernel != os.uname().release, f"built under the host's kernel {where.kernel}"
    assert where.kernel.endswith("-cloud-amd64"), f"not the guest's cloud kernel: {where.kernel}"
    assert where.boot_id != host_boot_id(), "built under the host's kernel (same boot id)"
    assert where.boot_id == guest_boot_id, "built in some other VM than this Virby's"


class Nix:
    """nix-build with the host configured through the environment only; remembers what it
    built so the test can delete it from /nix/store afterwards."""

    def __init__(self, workdir: Path, ssh_config: Path, *, share_connections: bool = False) -> None:
        """`share_connections`: keep the ssh_config's ControlMaster (what users get); off, each
        build opens its own connection and none outlives it (tests that stop or count)."""
        assert ssh_config.is_absolute(), "Nix runs ssh from another directory: -F needs an absolute path"
        self.expr = workdir / "where.nix"
        self.expr.write_text(WHERE_NIX)
        sshopts = f"-F {ssh_config}" + ("" if share_connections else " -o ControlPath=none")
        self.env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "NIX_SSHOPTS": sshopts}
        for var in ("NIX_REMOTE", "NIX_BUILDERS"):
            self.env.pop(var, None)
        self.paths: list[str] = []

    def build(self, *options: str, builders: str | None = None) -> Build:
        args = ["nix-build", str(self.expr), "--no-out-link", "--argstr", "nonce", uuid.uuid4().hex]
        if builders is not None:
            args += ["--max-jobs", "0", "--builders", builders]
        t0 = time.monotonic()
        proc = subprocess.run([*args, *options], env=self.env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False)
        seconds = time.monotonic() - t0
        if proc.returncode == 0:
            self.paths.append(proc.stdout.strip())
        return Build(proc, seconds)

    def delete_outputs(self) -> None:
        # --no-out-link: no GC roots, so the outputs and their .drv files can go
        for out in self.paths:
            drv = subprocess.run(["nix-store", "--query", "--deriver", out], env=self.env,
                                 capture_output=True, text=True, check=False).stdout.strip()
            subprocess.run(["nix-store", "--delete", out, *([drv] if drv.endswith(".drv") else [])],
                           env=self.env, capture_output=True, check=False)


def alias_builders(protocol: str = "ssh-ng") -> str:
    """A `--builders` line naming the `virby-vm` alias of a Virby ssh_config."""
    return f"{protocol}://virby-vm x86_64-linux - 1 1"
