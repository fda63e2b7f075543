"""Hypervisor backends behind one interface (base.Backend): a new backend is a new module."""

from __future__ import annotations

from virby.core.config import Config
from virby.core.keys import KeyPaths
from virby.workers.backends.base import Backend


def make_backend(config: Config, keys: KeyPaths) -> Backend:
    if config.backend == "vfkit":
        from virby.workers.backends.vfkit.backend import VfkitBackend

        return VfkitBackend(config, keys)
    from virby.workers.backends.qemu.backend import QemuBackend

    return QemuBackend(config, keys)
