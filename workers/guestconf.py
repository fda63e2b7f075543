"""The guest Nix's settings that come from the host's config, as the nix.conf fragment the
guest includes last (/etc/virby/nix.conf, in the archive appended to the initrd at every boot:
core/keys.py guest_keys_archive). A new config takes effect at the next boot."""

from __future__ import annotations

from virby.core.config import Config

MiB = 1 << 20
GiB = 1 << 30


def free_space(disk_size: int) -> tuple[int, int]:
    """Nix's own collection: when a build leaves less than `min-free` bytes free on the store's
    disk, the daemon deletes garbage until `max-free` are free. A tenth of the disk, at most
    5 GiB; then three times that, at most half the disk."""
    min_free = max(64 * MiB, min(disk_size // 10, 5 * GiB))
    max_free = max(min_free, min(3 * min_free, disk_size // 2))
    return min_free, max_free


def guest_nix_conf(config: Config) -> str:
    min_free, max_free = free_space(config.diskSize)
    lines = [
        "# written by the host (Virby) at boot from its config; read after /etc/nix/nix.conf",
        f"substituters = {' '.join(config.substituters)}",
        f"trusted-public-keys = {' '.join(config.trustedPublicKeys)}",
        f"min-free = {min_free}",
        f"max-free = {max_free}",
        # as many builds at once as the host sends (the machines line's maxJobs is `cores`)
        f"max-jobs = {config.cores}",
    ]
    return "\n".join(lines) + "\n"
