"""Shared directories under QEMU: one virtiofsd per share, so the guest mounts them as it does
under vfkit (virtio-fs, the same tags; the Debian guest's kernel has no 9p).

Each virtiofsd is started before QEMU, serves one vhost-user socket in the runtime dir, and
exits when QEMU disconnects from it, so a VM's shares end with the VM. The backend owns them
through HypervisorProcess records (adopted with QEMU, killed with it on a failed start).
vhost-user needs the guest's memory shared with virtiofsd: a memfd backend (`memory_args`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

from virby.core.config import Config
from virby.core.logtail import last_line
from virby.workers.backends.base import BackendError
from virby.workers.backends.process import HypervisorProcess

# Debian 12 ships it with QEMU (the C one, root only); Debian 13 and others as `virtiofsd`.
_CANDIDATES = ("virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
SOCKET_WAIT = 5.0


def find_virtiofsd() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def require_virtiofsd(c: Config) -> str:
    found = find_virtiofsd()
    if found is None:
        raise BackendError(f"sharedDirectories ({', '.join(sorted(c.sharedDirectories))}) need "
                           "virtiofsd, which is not installed (Debian: qemu-system-common or "
                           "virtiofsd)")
    return found


def socket_path(c: Config, tag: str) -> str:
    return c.runtime(f"fs-{tag}.sock")


def pid_path(c: Config, tag: str) -> str:
    return c.runtime(f"virtiofsd-{tag}.pid.json")


def device_args(c: Config) -> list[str]:
    """QEMU's half: a vhost-user-fs device per share, on its virtiofsd's socket."""
    args: list[str] = []
    for i, tag in enumerate(sorted(c.sharedDirectories)):
        args += ["-chardev", f"socket,id=fs{i},path={socket_path(c, tag)}",
                 "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag}"]
    return args


def memory_args(c: Config) -> list[str]:
    if not c.sharedDirectories:
        return []
    return ["-object", f"memory-backend-memfd,id=mem,size={c.memory}M,share=on",
            "-machine", "memory-backend=mem"]


def command(binary: str, c: Config, tag: str) -> list[str]:
    return [binary, f"--socket-path={socket_path(c, tag)}",
            "-o", f"source={c.sharedDirectories[tag]}", "-o", "cache=auto"]


def processes(c: Config) -> list[HypervisorProcess]:
    return [HypervisorProcess(f"virtiofsd ({tag})", pid_path(c, tag))
            for tag in sorted(c.sharedDirectories)]


async def start(c: Config, log_dir: str) -> list[HypervisorProcess]:
    """One virtiofsd per share, each listening before this returns. On failure the ones
    started are killed and BackendError names the share."""
    if not c.sharedDirectories:
        return []
    binary = require_virtiofsd(c)
    started: list[HypervisorProcess] = []
    try:
        for tag, proc in zip(sorted(c.sharedDirectories), processes(c), strict=True):
            sock = socket_path(c, tag)
            if os.path.exists(sock):
                os.unlink(sock)
            log_path = os.path.join(log_dir, f"virtiofsd-{tag}.log")
            await proc.start(command(binary, c, tag), log_path=log_path)
            started.append(proc)
            deadline = time.monotonic() + SOCKET_WAIT
            while not os.path.exists(sock):
                if not proc.alive():
                    raise BackendError(f"virtiofsd for the shared directory {tag} exited: "
                                       f"{last_line(log_path)}")
                if time.monotonic() > deadline:
                    raise BackendError(f"virtiofsd for the shared directory {tag} did not "
                                       f"listen within {SOCKET_WAIT:g}s")
                await asyncio.sleep(0.01)
    except BackendError:
        await stop(started)
        raise
    return started


async def stop(procs: list[HypervisorProcess]) -> None:
    for p in procs:
        await p.kill()
        p.forget()
