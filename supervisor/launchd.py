"""The launchd job that keeps Virby's arbiter running on macOS.

launchd starts `virby run`, which execs circusd in the foreground: launchd must see the arbiter
itself, never a daemonizing parent, or it would restart a job that is in fact running.
"""

from __future__ import annotations

import os
import plistlib
from collections.abc import Sequence

from virby.core.config import Config
from virby.core.watchers import LONGEST_GRACEFUL

LABEL = "org.nixos.virby"


def label(config: Config) -> str:
    """One job per builder: the default builder keeps the plain label, others get their name."""
    return LABEL if config.name == "virby-vm" else f"{LABEL}.{config.name}"

# circusd stops its watchers all at once, each within its graceful timeout; launchd must wait
# for the slowest (the vm watcher powering the guest off) and circusd's own exit before it
# sends SIGKILL. Its default, 20 s, is too short. nix/lib.nix repeats this number (tested).
EXIT_TIMEOUT = LONGEST_GRACEFUL + 10

# launchd's default soft limit is 256 open files. Every proxied SSH connection costs the
# forwarder two descriptors, and parallel Nix jobs each hold one connection.
OPEN_FILES = 4096

_SYSTEM_PATH = (
    "/run/current-system/sw/bin",  # nix-darwin's system profile
    "/nix/var/nix/profiles/default/bin",
    "/usr/bin",
    "/bin",
    "/usr/sbin",  # sysctl, to tell M1/M2 from later chips
    "/sbin",
)


def search_path(config: Config, virby_exe: str, extra: Sequence[str] = ()) -> str:
    """PATH for the job: where virby and the hypervisor live first, then the system's."""
    dirs = [*extra, os.path.dirname(virby_exe)]
    if os.path.isabs(config.hypervisor):
        dirs.append(os.path.dirname(config.hypervisor))
    dirs.extend(_SYSTEM_PATH)
    return ":".join(dict.fromkeys(d for d in dirs if d))


def render_plist(
    config_path: str,
    config: Config,
    *,
    virby_exe: str,
    user: str | None,
    extra_path: Sequence[str] = (),
) -> bytes:
    """The job's property list (XML), for /Library/LaunchDaemons/org.nixos.virby.plist.

    The log directory must exist before the job loads: launchd creates the two log files but
    not their folder, and fails the job silently if it is missing.
    """
    job: dict[str, object] = {
        "Label": label(config),
        "ProgramArguments": [virby_exe, "run", "--config", config_path],
        # Always running: the arbiter owns the port even while the VM is stopped (on demand).
        "RunAtLoad": True,
        "KeepAlive": True,
        "ExitTimeOut": EXIT_TIMEOUT,
        "WorkingDirectory": config.stateDir,
        "StandardOutPath": os.path.join(config.log_dir, "launchd.out"),
        "StandardErrorPath": os.path.join(config.log_dir, "launchd.err"),
        # Standard, not Background or Adaptive: Background throttles CPU and disk I/O, and
        # Adaptive only leaves Background while an XPC client holds a transaction, which we
        # never have. Builds in the guest run on the children of this job.
        "ProcessType": "Standard",
        "EnvironmentVariables": {"PATH": search_path(config, virby_exe, extra_path)},
        "SoftResourceLimits": {"NumberOfFiles": OPEN_FILES},
    }
    if user is not None:
        job["UserName"] = user
    return plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=True)
