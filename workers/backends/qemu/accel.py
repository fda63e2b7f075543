"""Which accelerator QEMU uses, and the KVM probe record that decides it for "auto".

`/dev/kvm` existing proves nothing (on some hosts it opens and yet cannot run a
stock guest), so "auto" with an untested /dev/kvm boots with KVM once; the backend keeps that
VM if it announces itself in time, else records "tcg". The record holds while the host kernel
and the QEMU binary stay the same.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

from virby.core.config import Config
from virby.core.files import write_json
from virby.workers.backends.qemu import machine

log = logging.getLogger("virby.qemu")

KVM_PROBE_TIMEOUT = 10.0  # a guest that works under KVM announces itself in ~1-2 s


class AccelProbe:
    """The accelerator for one config, and the probe record in its state dir."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def path(self) -> str:
        return self.config.state("accel-probe.json")

    def accel(self) -> str:
        """A setting, or for "auto" the recorded probe result ("kvm" while untested)."""
        if self.config.accel != "auto":
            return self.config.accel
        if not machine.can_accelerate(self.config.arch):
            return "tcg"  # KVM and HVF run the host's own arch only
        if sys.platform == "darwin":
            return "hvf"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        return self.recorded() or "kvm"

    def needs_probe(self) -> bool:
        """True when the next boot is the KVM probe."""
        return self.config.accel == "auto" and self.accel() == "kvm" and self.recorded() is None

    def _key(self) -> str:
        binary = shutil.which(self.config.hypervisor) or self.config.hypervisor
        try:
            mtime = os.stat(binary).st_mtime
        except OSError:
            mtime = 0.0
        return f"{os.uname().release} {binary} {mtime:.0f}"

    def recorded(self) -> str | None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != self._key():
            return None
        accel = data.get("accel")
        return accel if accel in ("kvm", "tcg") else None

    def record(self, accel: str, detail: str) -> None:
        try:
            write_json(self.path, {"key": self._key(), "accel": accel, "detail": detail})
        except OSError as e:
            log.warning("cannot record the KVM probe: %s", e)
