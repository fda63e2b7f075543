"""The guest Nix's settings from the host's config: validated keys, the nix.conf fragment in the
boot archive, min-free/max-free sized from diskSize."""

from __future__ import annotations

from pathlib import Path

import pytest

from virby.core.config import ConfigError, from_dict
from virby.core.keys import ensure_keys, guest_keys_archive
from virby.workers.guestconf import free_space, guest_nix_conf

KEY = "virby-test-1:SNvpSoIgBXh0gsz19anISfJWFQvAJh0/tHK3XpV/D00="


def test_substituters_and_keys_reach_the_fragment(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "diskSize": "20GiB", "cores": 3,
                   "substituters": ["http://10.0.2.2:8080/cache", "https://cache.example.org"],
                   "trustedPublicKeys": [KEY]})
    lines = guest_nix_conf(c).splitlines()
    assert "substituters = http://10.0.2.2:8080/cache https://cache.example.org" in lines
    assert f"trusted-public-keys = {KEY}" in lines
    assert "max-jobs = 3" in lines
    assert f"min-free = {free_space(c.diskSize)[0]}" in lines


def test_no_cache_unless_one_is_named(tmp_path: Path) -> None:
    lines = guest_nix_conf(from_dict({"stateDir": str(tmp_path)})).splitlines()
    assert "substituters = " in lines and "trusted-public-keys = " in lines


@pytest.mark.parametrize(("disk", "lo", "hi"), [
    (1 << 30, 100 << 20, 330 << 20),  # a test disk: a tenth, then three tenths
    (20 << 30, 2 << 30, 6 << 30),
    (1 << 40, 5 << 30, 15 << 30),  # capped: 5 GiB, then 15 GiB
])
def test_free_space_follows_the_disk(disk: int, lo: int, hi: int) -> None:
    min_free, max_free = free_space(disk)
    assert abs(min_free - lo) <= lo * 0.1 and abs(max_free - hi) <= hi * 0.1
    assert min_free < max_free <= disk // 2


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("substituters", "https://x", "a list of binary cache URLs"),
    ("substituters", ["ftp://x"], "substituters[0]"),
    ("substituters", ["https://a b"], "no spaces"),
    ("trustedPublicKeys", ["nocolon"], "trustedPublicKeys[0]"),
    ("trustedPublicKeys", ["k:" + "A" * 10 + "="], "ed25519"),
    ("guestNetwork", "open", '"nat" or "none"'),
])
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match="config key") as e:
        from_dict({"stateDir": str(tmp_path), key: value})
    assert needle in str(e.value)


def test_vfkit_cannot_cut_the_guest_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guestNetwork"):
        from_dict({"stateDir": str(tmp_path), "backend": "vfkit", "guestNetwork": "none"})


def test_the_boot_archive_carries_the_fragment(tmp_path: Path) -> None:
    c = from_dict({"stateDir": str(tmp_path), "trustedPublicKeys": [KEY]})
    data = guest_keys_archive(ensure_keys(c.stateDir), "builder", guest_nix_conf(c))
    # GNU cpio reads it back in tests/integration/test_cpio_gnu.py; here: the member and its bytes
    assert b"etc/virby/nix.conf\0" in data and guest_nix_conf(c).encode() in data
