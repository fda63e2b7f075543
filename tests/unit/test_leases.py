"""The macOS DHCP lease file parser, on samples in bootpd's format (/var/db/dhcpd_leases)."""

from __future__ import annotations

import pytest

from virby.workers.backends.vfkit import leases

# Before macOS 15: hw_address is "1,<mac>" with each octet's leading zero dropped. Two leases
# for the same MAC (an old one lingers); the later expiry is the current one.
CLASSIC = """\
{
\tname=virby-vm
\tip_address=192.168.64.3
\thw_address=1,2:94:a:b:c:d
\tidentifier=1,2:94:a:b:c:d
\tlease=0x66a1b2c3
}
{
\tname=ubuntu
\tip_address=192.168.64.4
\thw_address=1,52:54:0:70:2b:71
\tidentifier=1,52:54:0:70:2b:71
\tlease=0x66a1b300
}
{
\tname=virby-vm
\tip_address=192.168.64.9
\thw_address=1,2:94:a:b:c:d
\tidentifier=1,2:94:a:b:c:d
\tlease=0x66a1c000
}
"""

# macOS 15: a client that sends an RFC 4361 client id is stored by IAID + DUID, with no MAC
# (vfkit#242). The first block is systemd-networkd's DUID-EN (no MAC in it: unmatchable), the
# second a DUID-LL (type 3) and the third a DUID-LLT (type 1) of the MAC 02:94:0a:0b:0c:0d.
SEQUOIA = """\
{
\tname=nixos
\tip_address=192.168.64.30
\thw_address=ff,f1:f5:dd:7f:0:2:0:0:ab:11:b5:40:7c:3:e2:a9:8c:b3
\tidentifier=ff,f1:f5:dd:7f:0:2:0:0:ab:11:b5:40:7c:3:e2:a9:8c:b3
\tlease=0x6782bfd4
}
{
\tname=virby-vm
\tip_address=192.168.64.31
\thw_address=ff,0:0:0:1:0:3:0:1:2:94:a:b:c:d
\tidentifier=ff,0:0:0:1:0:3:0:1:2:94:a:b:c:d
\tlease=0x6782c000
}
{
\tname=virby-vm
\tip_address=192.168.64.32
\thw_address=ff,0:0:0:1:0:1:0:1:2e:f0:1a:2b:2:94:a:b:c:d
\tidentifier=ff,0:0:0:1:0:1:0:1:2e:f0:1a:2b:2:94:a:b:c:d
\tlease=0x6782b000
}
"""

MAC = "02:94:0a:0b:0c:0d"


def test_stripped_octets_match_the_full_mac_and_the_newest_lease_wins() -> None:
    assert leases.find_ip(CLASSIC, MAC) == "192.168.64.9"


def test_other_macs_do_not_match() -> None:
    assert leases.find_ip(CLASSIC, "52:54:00:70:2b:71") == "192.168.64.4"
    assert leases.find_ip(CLASSIC, "02:94:0a:0b:0c:0e") is None


def test_mac_case_and_zero_padding_do_not_matter() -> None:
    assert leases.find_ip(CLASSIC, "02:94:0A:0B:0C:0D") == "192.168.64.9"
    assert leases.find_ip(CLASSIC, "2:94:a:b:c:d") == "192.168.64.9"


def test_link_layer_duids_match_by_their_mac_newest_first() -> None:
    # 192.168.64.31 (DUID-LL) expires after .32 (DUID-LLT): it is the current lease.
    assert leases.find_ip(SEQUOIA, MAC) == "192.168.64.31"
    only_llt = SEQUOIA.replace("ip_address=192.168.64.31", "ip_address=bogus")
    assert leases.find_ip(only_llt, MAC) == "192.168.64.32"


def test_duid_en_has_no_mac_and_matches_nothing() -> None:
    assert leases.find_ip(SEQUOIA, "b5:40:7c:03:e2:a9") is None
    assert leases.find_ip(SEQUOIA, "a9:8c:b3:00:00:00") is None


def test_match_through_identifier_when_hw_address_is_missing() -> None:
    text = "{\n\tip_address=192.168.64.5\n\tidentifier=1,2:94:a:b:c:d\n\tlease=0x1\n}\n"
    assert leases.find_ip(text, MAC) == "192.168.64.5"


def test_parse_reads_every_field() -> None:
    first = leases.parse(CLASSIC)[0]
    assert first == leases.Lease(ip="192.168.64.3", name="virby-vm",
                                 hw_address="1,2:94:a:b:c:d", identifier="1,2:94:a:b:c:d",
                                 expires=0x66a1b2c3)


def test_malformed_blocks_are_skipped_not_fatal() -> None:
    text = ("{\n\tname=broken\n\tip_address=not-an-ip\n\thw_address=1,2:94:a:b:c:d\n}\n"
            "{\n\tip_address=192.168.64.7\n\thw_address=1,zz:94:a:b:c:d\n\tlease=0xnope\n}\n"
            "garbage outside a block\n"
            "{\n\tip_address=192.168.64.8\n\thw_address=1,2:94:a:b:c:d\n\tlease=0x2\n}\n"
            "{\n\tip_address=192.168.64.99\n")  # truncated: bootpd was writing
    assert [lease.ip for lease in leases.parse(text)] == ["192.168.64.7", "192.168.64.8"]
    assert leases.find_ip(text, MAC) == "192.168.64.8"


def test_parse_mac_rejects_garbage() -> None:
    for bad in ["", "02:94:0a:0b:0c", "02:94:0a:0b:0c:0d:0e", "02:94:0a:0b:0c:zz", "2:94::b:c:d",
                "02:94:0a:0b:0c:100"]:
        with pytest.raises(ValueError, match="not a MAC"):
            leases.parse_mac(bad)


def test_lookup_reads_the_file_and_tolerates_its_absence(tmp_path) -> None:
    path = tmp_path / "dhcpd_leases"
    assert leases.lookup(MAC, str(path)) is None
    path.write_text(CLASSIC)
    assert leases.lookup(MAC, str(path)) == "192.168.64.9"
