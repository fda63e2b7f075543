"""The Mac's contract, run here: the lock's aarch64 nix guest (the bytes vfkit boots on a Mac)
under qemu-system-aarch64 -M virt with `qemuDevices: "vfkit"`, the devices vfkit gives it: the
console on hvc0, the agent on an unnamed virtio console backed by a host pty (hvc1), DHCP, the
store on virtio-blk, virtio-rng, a balloon, a virtio-fs share, no serial port, no named port, and
no power button (virt has none this kernel hears). The host speaks to the agent through the same
client (workers/agent.py `open_pty`) the vfkit backend uses. One VM for the whole module,
reached through the forwarder like any builder; the cold stop comes last."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.harness import Instance
from testing.nixhost import GUEST_HOSTNAMES, Nix, Where
from tests.e2e import guestclock
from tests.require import require

pytestmark = pytest.mark.e2e

TOKEN = uuid.uuid4().hex


@pytest.fixture(scope="module")
def mac(guest_aarch64_nix_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    share = tmp_path_factory.mktemp("share")
    share.chmod(0o755)  # the guest's builder user reads it (virtiofsd keeps host owners and modes)
    (share / "token").write_text(TOKEN + "\n")
    with Instance(guest_dir=guest_aarch64_nix_dir, arch="aarch64", memory=512,
                  qemuDevices="vfkit", sharedDirectories={"src": str(share)},
                  onDemand={"pauseAfter": None, "stopAfter": None}) as inst:
        inst.start()
        yield inst


def vm_log(inst: Instance) -> str:
    return (Path(inst.config.log_dir) / "vm.log").read_text()


def test_a_cold_ssh_is_served_on_the_agents_word(mac: Instance) -> None:
    out = mac.ssh("cat /proc/cmdline; uname -m")  # the first connection boots the VM
    assert out.returncode == 0, out.stderr
    cmdline, machine = out.stdout.split("\n")[:2]
    assert machine == "aarch64"
    assert "console=hvc0" in cmdline.split() and "virby.net=dhcp" in cmdline.split()
    qemu = mac.qemu()
    assert qemu is not None
    argv = qemu.cmdline()
    assert "-serial" not in argv and not any("virtserialport" in a for a in argv)
    # readiness came from the agent, over the pty, with the address DHCP gave the guest
    log = mac.wait_log("vm", "the guest agent announced sshd")
    assert "the guest agent announced sshd at 10.0.2.15 (/dev/pts/" in log
    assert "lease" not in log.lower()


def test_the_agent_is_on_the_second_virtio_console_and_the_balloon_is_loaded(mac: Instance) -> None:
    out = mac.ssh("cat /sys/class/tty/console/active; ls /sys/class/virtio-ports; "
                  "grep -c virtio_balloon /proc/modules")
    assert out.returncode == 0, out.stderr
    active, *rest = out.stdout.split()
    assert active == "hvc0"
    assert rest[-1] == "1", "virtio_balloon is not loaded"
    # what keeps the guest right over weeks: udhcpc stays to renew its lease, and the clock
    # follower runs (both respawned or daemonised at boot)
    ps = mac.ssh("ps -o args")
    assert any(line.startswith("udhcpc ") for line in ps.stdout.splitlines()), ps.stdout
    assert any("virby-clock" in line for line in ps.stdout.splitlines()), ps.stdout
    # two unnamed console ports (vport*p0/p1 have no name file content): console and agent
    named = mac.ssh("cat /sys/class/virtio-ports/*/name 2>/dev/null | grep -c . || true")
    assert named.stdout.strip() == "0", f"named virtio ports: {named.stdout}"


def test_a_shared_directory_is_mounted_under_mnt_virtiofs(mac: Instance) -> None:
    out = mac.ssh("cat /mnt/virtiofs/src/token && grep ' /mnt/virtiofs/src ' /proc/mounts")
    assert out.returncode == 0, out.stderr
    token, mount = out.stdout.split("\n")[:2]
    assert token == TOKEN
    assert mount.split()[2] == "virtiofs"


def test_the_guest_clock_is_right_after_a_20s_pause(mac: Instance) -> None:
    before = guestclock.read(mac)  # the same guest after the pause: its uptime went on
    mac.cli("pause")
    beats: list[float] = []

    def paused_for_20s(states: dict) -> bool:
        if states.get("vm", {}).get("state") == "paused":
            beats.append(time.monotonic())
        return len(beats) >= 2 and beats[-1] - beats[0] >= 20.0

    mac.wait_bus(paused_for_20s, 40, "the VM to stay paused for 20 s")
    confirmed = (mac.dir / "state" / "logs" / "vm.log").read_text().count(guestclock.CONFIRMED)
    mac.cli("resume")
    guestclock.wait_confirmed(mac, times=confirmed + 1)
    now = guestclock.read(mac)
    assert abs(now.off) <= 1.0, f"{now} after the resume\n{guestclock.clock_lines(mac)}"
    assert now.uptime >= before.uptime


def test_a_host_nix_aarch64_build_runs_in_the_guest(mac: Instance) -> None:
    require("nix-build", "apt-get install -y --no-install-recommends nix-bin")
    nix = Nix(mac.dir, mac.ssh_config)
    try:
        build = nix.build("--option", "system", "aarch64-linux",
                          builders=f"ssh-ng://{mac.config.name} aarch64-linux - 1 1")
        where = Where.read(build.out)
    finally:
        nix.delete_outputs()
    assert where.hostname in GUEST_HOSTNAMES
    assert where.kernel.endswith("-cloud-arm64"), where.kernel


def test_a_cold_stop_goes_through_the_agent_and_leaves_the_store_clean(mac: Instance) -> None:
    # virt has no power button this kernel hears: only the agent can power the guest off
    out = mac.cli("stop", "--cold", timeout=10)
    assert out.stdout.strip() == "VM stopped"
    assert mac.qemu() is None
    assert "virby-guest: shutting down" in (Path(mac.config.log_dir) / "console.log").read_text()
    assert "did not power off" not in vm_log(mac)
    fsck = subprocess.run(["e2fsck", "-fn", str(Path(mac.config.stateDir) / "disk.raw")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert fsck.returncode == 0, f"e2fsck -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
