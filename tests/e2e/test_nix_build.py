"""Nix builds through the forwarder, for real: the host's Nix (Debian's nix-bin 2.8) builds a
derivation it is not allowed to build itself (`--max-jobs 0`) on `virby-vm`, reached through
the ssh_config alias `virby ssh-config` prints. The VM is stopped when the build starts, so the
build's own SSH connection is what boots it.

The host's Nix is configured through the environment only (a single-user Nix, as Debian ships it): no
`nixbld` group, no binary cache, and `NIX_SSHOPTS=-F <absolute path>` (Nix runs ssh from another
working directory). Each derivation carries a fresh nonce, so it is never already in the host's
/nix/store; what it writes (hostname, kernel release, boot id, read from /proc with shell
builtins only, so it *would* also build on the host) is what proves where it ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testing.harness import Instance
from testing.nixhost import Nix, Where, alias_builders, assert_built_in_guest, host_boot_id
from tests.require import require

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def host_nix() -> None:
    require("nix-build", "apt-get install -y --no-install-recommends nix-bin")


@pytest.fixture
def vm(guest_nix_dir: Path) -> Iterator[Instance]:
    with Instance(guest_dir=guest_nix_dir, memory=512) as inst:
        inst.start()
        yield inst


@pytest.fixture
def nix(vm: Instance) -> Iterator[Nix]:
    n = Nix(vm.dir, vm.ssh_config)
    yield n
    n.delete_outputs()


def builders_for(vm: Instance, protocol: str, form: str) -> str:
    if form == "machines":
        line = vm.cli("nix-machines", "--protocol", protocol).stdout.strip()
        fields = line.split()
        assert len(fields) == 8 and fields[0] == f"{protocol}://virby-vm", line
        assert os.path.isabs(fields[2]), f"the key in the machines line is not absolute: {line}"
        return line
    return alias_builders(protocol)


@pytest.mark.parametrize(("protocol", "form"), [
    ("ssh-ng", "alias"), ("ssh", "alias"), ("ssh-ng", "machines"), ("ssh", "machines"),
])
def test_a_build_boots_the_vm_runs_there_and_the_next_reuses_it(
        vm: Instance, nix: Nix, protocol: str, form: str,
        record_property: Callable[[str, object], None]) -> None:
    builders = builders_for(vm, protocol, form)
    assert vm.status()["vm"]["state"] == "stopped" and vm.qemu() is None

    cold = nix.build(builders=builders)
    first = Where.read(cold.out)
    assert f"on '{protocol}://virby-vm'" in cold.proc.stderr, cold.proc.stderr
    st = vm.status()["vm"]
    assert st["boots"] == 1 and st["state"] == "running", st

    warm = nix.build(builders=builders)
    second = Where.read(warm.out)
    assert vm.status()["vm"]["boots"] == 1

    guest = vm.ssh("cat", "/proc/sys/kernel/random/boot_id")
    assert guest.returncode == 0, guest.stderr
    for where in (first, second):
        assert_built_in_guest(where, guest.stdout.strip())
    assert vm.status()["vm"]["boots"] == 1

    record_property("cold_build_s", round(cold.seconds, 2))
    record_property("warm_build_s", round(warm.seconds, 2))
    print(f"\n{protocol} ({form}): cold build {cold.seconds:.2f}s "
          f"(boot {st['last_boot_seconds']}s), warm build {warm.seconds:.2f}s")


def test_the_guest_check_rejects_a_build_done_on_the_host(tmp_path: Path) -> None:
    """The same derivation built on the host (no builders, no sandbox: Debian's /bin/sh is
    dynamic) succeeds, and `assert_built_in_guest` refuses its output."""
    nix = Nix(tmp_path, tmp_path / "unused_ssh_config")
    try:
        local = nix.build("--option", "sandbox", "false")
        where = Where.read(local.out)
        with pytest.raises(AssertionError):
            assert_built_in_guest(where, where.boot_id)
        assert where.boot_id == host_boot_id()
    finally:
        nix.delete_outputs()


def test_a_stale_pinned_host_key_fails_the_build_with_ssh_s_reason(vm: Instance) -> None:
    """A known_hosts that pins another key (a reinstalled Virby, say): Nix shows ssh's
    verdict, then its generic "unable to start any build"; nothing is built anywhere."""
    stale = vm.dir / "stale_known_hosts"
    stale.write_text("virby-vm-key ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIDsQmNGkgesJAJrOH3+8MlSsZ/dv3X2w5jEycjuLr0Hd\n")
    pinned = str(Path(vm.config.stateDir) / "ssh_known_hosts")
    text = vm.ssh_config.read_text()
    assert f"GlobalKnownHostsFile {pinned}\n" in text
    config = vm.dir / "ssh_config.stale"
    config.write_text(text.replace(pinned, str(stale)))
    nix = Nix(vm.dir, config)
    build = nix.build(builders=builders_for(vm, "ssh-ng", "machines"))
    nix.delete_outputs()
    assert build.proc.returncode != 0 and not nix.paths
    assert "Host key verification failed." in build.proc.stderr
    assert "unable to start any build" in build.proc.stderr


def test_a_vm_that_never_gets_ready_fails_the_build(guest_nix_dir: Path) -> None:
    """The forwarder holds the connection while the VM boots, then drops it when the boot
    fails: ssh reports the reset, Nix says "unable to start any build"."""
    with Instance(guest_dir=guest_nix_dir, memory=512, readyTimeout=8,
                  guest={"cmdline": "console=ttyS0 quiet panic=-1 virby.noready"}) as inst:
        inst.start()
        nix = Nix(inst.dir, inst.ssh_config)
        build = nix.build(builders=builders_for(inst, "ssh-ng", "alias"))
        nix.delete_outputs()
        assert build.proc.returncode != 0 and not nix.paths
        assert "Connection reset by peer" in build.proc.stderr or \
            "Connection closed" in build.proc.stderr, build.proc.stderr
        assert "unable to start any build" in build.proc.stderr
        st = inst.wait_vm("failed", timeout=30)
        assert "guest not ready within 8s" in st["reason"]


def test_a_build_survives_a_cold_stop_and_the_store_grows_with_disk_size(
        tmp_path: Path, guest_nix_dir: Path) -> None:
    """The guest's store lives on <stateDir>/disk.raw: a build done before `virby stop --cold` (the VM
    powers off, RAM is gone) is still valid after the next cold boot; a bigger diskSize later
    grows the filesystem at boot, keeping it; a smaller one is refused."""
    state = tmp_path / "state"
    outputs: list[str] = []
    try:
        with Instance(guest_dir=guest_nix_dir, memory=512, diskSize="1GiB",
                      stateDir=str(state)) as inst:
            inst.start()
            nix = Nix(inst.dir, inst.ssh_config)
            built = nix.build(builders=builders_for(inst, "ssh-ng", "alias"))
            out = str(built.out)
            outputs += nix.paths
            first = Where.read(built.out)
            inst.cli("stop", "--cold")  # a suspend would keep the RAM: power it off
            inst.wait_vm("stopped")
            assert inst.qemu() is None
            again = inst.ssh(f"nix-store --check-validity {out} && cat {out} && "
                             "cat /proc/sys/kernel/random/boot_id && df -k /nix | tail -1")
            logs = Path(inst.config.log_dir)
            assert again.returncode == 0, (
                f"{again.stderr}\nconsole:\n{(logs / 'console.log').read_text()[-3000:]}"
                f"\nvm.log:\n{(logs / 'vm.log').read_text()[-3000:]}")
            lines = again.stdout.splitlines()
            assert Where(*lines[0].split()) == first
            assert lines[1].strip() != first.boot_id, "not a new boot"
            assert inst.status()["vm"]["boots"] == 2
            small_kib = int(lines[2].split()[1])
        assert (state / "disk.raw").stat().st_size == 1 << 30

        with Instance(guest_dir=guest_nix_dir, memory=512, diskSize="2GiB",
                      stateDir=str(state)) as inst:
            inst.start()
            grown = inst.ssh(f"nix-store --check-validity {out} && df -k /nix | tail -1")
            assert grown.returncode == 0, grown.stderr
            assert int(grown.stdout.split()[1]) > small_kib * 1.8
            assert "grew the Nix store" in (Path(inst.config.log_dir) / "console.log").read_text()
        assert (state / "disk.raw").stat().st_size == 2 << 30

        with Instance(guest_dir=guest_nix_dir, memory=512, diskSize="1GiB",
                      stateDir=str(state)) as inst:
            inst.start()
            refused = inst.ssh("true", timeout=60)
            assert refused.returncode != 0
            assert "never shrunk" in str(inst.status()["vm"].get("reason")), inst.status()["vm"]
        assert (state / "disk.raw").stat().st_size == 2 << 30
    finally:
        host = Nix(tmp_path, tmp_path / "unused")
        host.paths = outputs
        host.delete_outputs()
