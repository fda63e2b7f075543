"""The Nix store disk's use, for `virby status`.

While the VM runs, the guest's own view: `df` on /nix over one SSH session straight to the
guest's sshd (the endpoint the vm worker publishes), not through the forwarder, so asking does
not count as activity and never wakes or keeps up the VM. Otherwise only what the host sees: the
disk file's size and how much of it has been written (a sparse file: blocks the guest freed
stay allocated)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from virby.core.config import Config
from virby.core.keys import HOST_KEY_ALIAS, KeyPaths
from virby.core.protocol import RUNNING

SSH_TIMEOUT = 5.0


def _ssh_argv(config: Config, host: str, port: int, command: str) -> list[str]:
    keys = KeyPaths.in_dir(config.stateDir)
    opts = {
        "HostName": host, "Port": str(port), "User": config.sshUser,
        "IdentityFile": keys.client_key, "IdentitiesOnly": "yes",
        "GlobalKnownHostsFile": keys.known_hosts, "UserKnownHostsFile": "/dev/null",
        "HostKeyAlias": HOST_KEY_ALIAS, "StrictHostKeyChecking": "yes", "BatchMode": "yes",
        "ConnectTimeout": "3", "ControlPath": "none",
    }
    argv = ["ssh", "-F", "/dev/null"]
    for k, v in opts.items():
        argv += ["-o", f"{k}={v}"]
    return [*argv, config.name, command]


def parse_df(text: str) -> dict[str, int] | None:
    """`df -kP /nix` → size, used, avail in bytes (None if it does not look like df's)."""
    lines = text.strip().splitlines()
    fields = lines[-1].split() if len(lines) >= 2 else []
    if len(fields) < 6 or not all(f.isdigit() for f in fields[1:4]):
        return None
    size, used, avail = (int(f) * 1024 for f in fields[1:4])
    return {"size": size, "used": used, "avail": avail}


def store_use(config: Config, vm: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"disk_size": config.diskSize, "allocated": None, "guest": None}
    try:
        st = os.stat(config.state("disk.raw"))
        out["allocated"] = st.st_blocks * 512
    except OSError:
        pass
    endpoint = vm.get("endpoint")
    if vm.get("state") == RUNNING and isinstance(endpoint, list) and len(endpoint) == 2:
        host, port = endpoint
        try:
            proc = subprocess.run(_ssh_argv(config, str(host), int(port), "df -kP /nix"),
                                  capture_output=True, text=True, timeout=SSH_TIMEOUT, check=False)
            out["guest"] = parse_df(proc.stdout) if proc.returncode == 0 else None
            if out["guest"] is None:
                out["error"] = (proc.stderr.strip().splitlines() or [f"ssh exited {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            out["error"] = str(e) or type(e).__name__
    return out
