"""The QEMU backend: backend.py (the Backend), launch.py (its start, shared with the tests and
the bench) and accel.py (the accelerator and its KVM probe).
The keyed initrd and the data disk are shared with vfkit (backends/initrd.py, disk.py)."""

from virby.workers.backends.qemu.backend import QemuBackend

__all__ = ["QemuBackend"]
