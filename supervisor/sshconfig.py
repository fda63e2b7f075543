"""What other programs need to reach the builder: the ssh_config block (`virby ssh-config`,
`virby ssh`, doctor's SSH check) and the Nix machines line (`virby nix-machines`)."""

from __future__ import annotations

import base64
import getpass
import os

from virby.core.config import Config
from virby.core.keys import HOST_KEY_ALIAS, KeyPaths


def control_persist(config: Config) -> int:
    """Seconds an idle shared connection stays open: it counts as an open connection, so it
    must end well before the idle monitor's pause (or stop, without a pause) for the policy to
    hold; at most 30 s, which covers the gaps between a build's derivations."""
    idle = config.onDemand.pauseAfter or config.onDemand.stopAfter
    return 30 if idle is None else max(1, min(30, int(idle // 2)))


def control_users(owner: str | None = None) -> tuple[str, ...]:
    """Who shares connections: those who may create the control socket in the runtime dir (its
    owner, and root: the Nix daemon's user). Anyone else connecting through the same ssh_config
    gets plain connections (a socket that cannot be created would end ssh)."""
    me = owner or os.environ.get("USER") or getpass.getuser()
    return ("root",) if me == "root" else ("root", me)


def ssh_config_text(config: Config, host: str = "virby-vm", *,
                    mux_users: tuple[str, ...] | None = None) -> str:
    """The ssh_config block for the builder (also what nix/lib.nix writes on a Mac)."""
    keys = KeyPaths.in_dir(config.stateDir)
    # The forwarder accepts at once but the banner comes only when the guest is up: the
    # timeout must cover a cold boot.
    connect_timeout = int(config.readyTimeout) + 15
    users = mux_users if mux_users is not None else control_users()
    return "\n".join([
        f"Host {host}",
        "  HostName 127.0.0.1",
        f"  Port {config.port}",
        f"  User {config.sshUser}",
        f"  IdentityFile {keys.client_key}",
        "  IdentitiesOnly yes",
        # Global + /dev/null: the same text works in /etc/ssh/ssh_config.d for every user
        # (nix/lib.nix writes it there) and no user's own known_hosts can interfere.
        f"  GlobalKnownHostsFile {keys.known_hosts}",
        "  UserKnownHostsFile /dev/null",
        f"  HostKeyAlias {HOST_KEY_ALIAS}",
        "  StrictHostKeyChecking yes",
        f"  ConnectTimeout {connect_timeout}",
        "  BatchMode yes",
        *(mux_lines(config, host, users) if mux_fits(config) else []),
        "",
    ])


# ssh binds the control socket as <ControlPath>.<16 random characters>, then renames it; %C is
# 40 hex digits. A unix socket's path is at most 103 bytes on macOS.
_MUX_NAME_MAX = len("/ssh-") + 40 + 17


def mux_fits(config: Config) -> bool:
    return len(config.runtimeDir) + _MUX_NAME_MAX < 104


def mux_lines(config: Config, host: str, users: tuple[str, ...]) -> list[str]:
    # One SSH connection for many derivations: each new one costs the guest a handshake.
    # The socket sits in the private runtime dir (%C: a hash of host, port and user).
    return [
        f"Match originalhost {host} localuser {','.join(users)}",
        "  ControlMaster auto",
        f"  ControlPath {config.runtime('ssh-%C')}",
        f"  ControlPersist {control_persist(config)}",
    ]


def guest_systems(config: Config) -> list[str]:
    """The systems the builder serves: its guest's arch; Rosetta adds x86_64 to an aarch64
    guest (the guest registers it with binfmt_misc: image/guest/common/etc/rc.d/rosetta.sh)."""
    systems = [f"{config.arch}-linux"]
    if config.rosetta and config.arch == "aarch64":
        systems.append("x86_64-linux")
    return systems


def nix_machines_line(config: Config, *, host: str | None = None, protocol: str = "ssh-ng",
                      speed_factor: int = 1) -> str:
    """The /etc/nix/machines line: URI, systems, key, jobs, speed, features, host key."""
    keys = KeyPaths.in_dir(config.stateDir)
    try:
        with open(keys.host_pub) as f:
            host_key = base64.b64encode(" ".join(f.read().split()[:2]).encode()).decode()
    except OSError:
        host_key = "-"  # no keys yet: `virby run` makes them; ssh_config still pins the key
    features = ["benchmark", "big-parallel"]
    if config.nestedVirtualization:
        features += ["kvm", "nixos-test"]  # only where the guest really has /dev/kvm
    return " ".join([f"{protocol}://{host or config.name}", ",".join(guest_systems(config)), keys.client_key,
                     str(config.cores), str(speed_factor), ",".join(features), "-", host_key])
