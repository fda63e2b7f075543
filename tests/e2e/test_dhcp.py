"""The guest's network by DHCP (`virby.net=dhcp` on the kernel command line), as under vfkit's
NAT, where the address is not known in advance. QEMU's slirp answers DHCP too, so the same guest
bytes take the same path here."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.harness import Instance

pytestmark = pytest.mark.e2e


def test_a_guest_told_to_use_dhcp_gets_its_address_and_serves_ssh(guest_dir: Path) -> None:
    with Instance(guest_dir=guest_dir,
                  guest={"cmdline": "console=ttyS0 quiet panic=-1 virby.net=dhcp"}) as inst:
        inst.start()
        out = inst.ssh("ip -4 addr show")
        assert out.returncode == 0, out.stderr
        # slirp's lease; with restrict=on slirp offers no router and no DNS server, so the
        # route and resolv.conf parts of the hook are exercised only under vfkit's NAT
        assert "10.0.2.15/24" in out.stdout, out.stdout
        console = (Path(inst.config.log_dir) / "console.log").read_text()
        assert "virby-guest: address 10.0.2.15/24 from DHCP on" in console, console[-2000:]
        assert "no DHCP lease" not in console
