"""What differs between guests on QEMU's command line: the arch (x86_64 q35, aarch64 virt) and
the device layout (`qemuDevices`).

The rest of the argv (memory, kernel, user networking, QMP, disks) is the same everywhere: the
devices are PCI on q35 and on `-M virt` alike, as vfkit's are, so one guest image serves both
hypervisors. The guest agent always sits on an unnamed virtio console port (the guest takes the
first virtio console that is not the kernel's console):

* "standard": the console is each machine's first serial port (ttyS0 on q35, the PL011
  ttyAMA0 on virt); the agent is a virtio console (hvc0) on a unix socket.
* "vfkit": what vfkit gives the guest. The console is the first virtio console (hvc0, to a
  file), the agent the second (hvc1) on a host pty; DHCP on the kernel command line; a balloon;
  no serial port, no named port, no vmgenid.
"""

from __future__ import annotations

from dataclasses import dataclass

from virby.core.config import host_arch


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


def console_and_agent_args(layout: str, console_log: str, agent_socket: str) -> list[str]:
    """The console and the agent's port. In the vfkit layout the agent's chardev is a pty
    (QMP `query-chardev` tells its path), as vfkit's `virtio-serial,pty` is."""
    console = ["-chardev", f"file,id=console,path={console_log},append=on"]
    if layout == "vfkit":
        return [*console, "-chardev", "pty,id=agent",
                "-device", "virtio-serial-pci,id=vser0",
                "-device", "virtconsole,chardev=console,bus=vser0.0",
                "-device", "virtconsole,chardev=agent,bus=vser0.0"]
    return [*console, "-serial", "chardev:console",
            "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtconsole,chardev=agent,bus=vser0.0"]


def layout_device_args(layout: str, m: Machine) -> list[str]:
    if layout == "vfkit":
        return ["-device", "virtio-balloon-pci"]
    # A new VM generation ID at every start, a restore included: the guest kernel
    # (CONFIG_VMGENID) reseeds its RNG at once when it changes (issue 14). An ACPI device: q35
    # only (qemu-system-aarch64 has none); vfkit has none either.
    return ["-device", "vmgenid,guid=auto"] if m.machine == "q35" else []
