"""What differs between an x86_64 and an aarch64 guest on QEMU's command line.

The rest of the argv (memory, kernel, user networking, QMP, disk) is the same on both: the
devices are PCI on q35 and on `-M virt` alike, as vfkit's are, so one guest image serves both
hypervisors. The console is each machine's first serial port (ttyS0 on q35, the PL011 ttyAMA0
on virt); the agent is the second serial port on x86_64 and a virtio-console port named
`virby.agent` on aarch64 (virt has one PL011 only; LOCK.md's guest contract).
"""

from __future__ import annotations

from dataclasses import dataclass

from virby.supervisor.config import host_arch

AGENT_PORT_NAME = "virby.agent"


@dataclass(frozen=True)
class Machine:
    arch: str
    machine: str  # -M
    # -cpu under TCG. aarch64: cortex-a72, not `max`, whose pointer authentication QEMU emulates
    # slowly (issue 13: 4.7-5.0 s to `ssh true` against 21.8-25.1 s; README "aarch64 guests").
    tcg_cpu: str | None
    # QMP system_powerdown reaches the guest: ACPI on q35. virt without UEFI firmware has only a
    # gpio-keys power button, which Debian's cloud kernel does not build: the agent powers off.
    power_button: bool


MACHINES = {
    "x86_64": Machine("x86_64", "q35", tcg_cpu=None, power_button=True),
    "aarch64": Machine("aarch64", "virt", tcg_cpu="cortex-a72", power_button=False),
}


def machine_for(arch: str) -> Machine:
    return MACHINES[arch]


def can_accelerate(arch: str) -> bool:
    """KVM and HVF run a guest of the host's own architecture only; anything else is TCG."""
    return arch == host_arch()


def cpu_args(m: Machine, accel: str) -> list[str]:
    if accel in ("kvm", "hvf"):
        return ["-cpu", "host"]
    return ["-cpu", m.tcg_cpu] if m.tcg_cpu else []


def agent_args(m: Machine, chardev: str) -> list[str]:
    if m.arch == "x86_64":
        return ["-serial", f"chardev:{chardev}"]
    return ["-device", "virtio-serial-pci",
            "-device", f"virtserialport,chardev={chardev},name={AGENT_PORT_NAME}"]
