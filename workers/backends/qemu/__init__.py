"""The QEMU backend: backend.py (the Backend), initrd.py (the keyed initrd), accel.py (the
accelerator and its KVM probe)."""

from virby.workers.backends.qemu.backend import QemuBackend

__all__ = ["QemuBackend"]
