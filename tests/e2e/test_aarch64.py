"""The Mac's guest here: the aarch64 guest (the kernel and initrd bytes vfkit would boot) under
qemu-system-aarch64 -M virt, emulated (TCG), reached through the forwarder like any builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.harness import Instance

pytestmark = pytest.mark.e2e


def test_the_aarch64_guest_boots_through_the_forwarder_and_powers_off(guest_aarch64_dir: Path) -> None:
    with Instance(guest_dir=guest_aarch64_dir, arch="aarch64", memory=512) as vm:
        vm.start()
        assert vm.config.hypervisor == "qemu-system-aarch64"
        out = vm.ssh("uname", "-m")  # the first connection boots the VM
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "aarch64"
        qemu = vm.qemu()
        assert qemu is not None and qemu.name() == "qemu-system-aarch64"
        console = (Path(vm.config.log_dir) / "console.log").read_text()
        assert "virby-guest: up in" in console

        # no power button on virt without firmware: `stop --cold` asks the agent, and the guest
        # powers itself off (the kill after the shutdown timeout is logged as such)
        assert vm.cli("stop", "--cold", timeout=90).stdout.strip() == "VM stopped"
        assert vm.qemu() is None
        assert "virby-guest: shutting down" in (Path(vm.config.log_dir) / "console.log").read_text()
        assert "did not power off" not in (Path(vm.config.log_dir) / "vm.log").read_text()
