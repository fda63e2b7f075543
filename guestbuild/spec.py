"""What goes into each guest variant: packages to start the closure from, the files to ship,
the kernel modules to load. Everything else is derived (libraries from DT_NEEDED, module
order from each module's `depends=`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("base", "nix")
SUITE = "trixie"
# Here (not in lock.py) so that the CLI can show the default without importing the lock code:
# every `virby` command mounts the `guest` group, `virby status` included.
# image/ sits next to guestbuild/: the checkout's image/, or in an installed wheel virby/image/
# (setup.cfg ships image/guest/ and the lock as package data of `virby.image`).
REPO_IMAGE = Path(__file__).resolve().parents[1] / "image"
DEFAULT_LOCK = REPO_IMAGE / "guest.lock.json"
GUEST_DIR = REPO_IMAGE / "guest"  # the guest's own files: init, rc, agent (image/guest/)
# What a guest cannot boot without: busybox init reads inittab, which runs rc.
GUEST_REQUIRED = ("common/etc/inittab", "common/etc/rc")


@dataclass(frozen=True)
class ArchSpec:
    deb_arch: str
    multiarch: str
    kernel_meta: str  # the metapackage whose Depends names the concrete kernel package
    modules: tuple[str, ...]  # loaded in dependency order; built-in ones are skipped


ARCHES = {
    "x86_64": ArchSpec("amd64", "x86_64-linux-gnu", "linux-image-cloud-amd64", (
        "virtio_pci", "virtio_mmio", "virtio_net", "virtio-rng", "virtio_console", "evdev",
        "button", "vmw_vsock_virtio_transport", "virtio_balloon")),
    "aarch64": ArchSpec("arm64", "aarch64-linux-gnu", "linux-image-cloud-arm64", (
        # (the cloud kernel has no gpio_keys: the power button works where the VM has ACPI)
        "virtio_pci", "virtio_mmio", "virtio_net", "virtio-rng", "virtio_console", "evdev",
        "button", "vmw_vsock_virtio_transport", "virtio_balloon",
        # Rosetta (etc/rc.d/rosetta.sh): vfkit's "rosetta" virtiofs share, binfmt_misc for it
        "virtiofs", "binfmt_misc")),
}

# Extra modules per variant: the nix store lives on a virtio-blk disk, formatted ext4.
VARIANT_MODULES = {"base": (), "nix": ("virtio_blk", "ext4", "crc32c_generic")}

# Packages the closure starts from (the kernel is added per arch). Libraries come from the
# ELF closure of SHIP, searched among these packages' Depends, transitively.
ROOT_PACKAGES = {
    "base": ("busybox-static", "dropbear-bin"),
    "nix": ("busybox-static", "dropbear-bin", "nix-bin", "e2fsprogs", "openssh-sftp-server",
            "ca-certificates", "netcat-openbsd"),
}

# Files copied from the packages (tree paths; a symlink brings its target too).
SHIP = {
    "base": ("usr/bin/busybox", "usr/sbin/dropbear"),
    "nix": ("usr/bin/busybox", "usr/sbin/dropbear", "usr/bin/nix", "usr/sbin/mke2fs",
            "usr/sbin/resize2fs", "etc/mke2fs.conf", "usr/lib/openssh/sftp-server",
            # a login's `nix-daemon --stdio` joins the running daemon through it (usr/bin/nix-daemon)
            "usr/bin/nc.openbsd"),
}

# The CA bundle (substituters and fetches over https): what update-ca-certificates would write
# at install time, every certificate the package ships, concatenated in path order.
CA_SOURCE = {"base": None, "nix": "usr/share/ca-certificates/"}
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"

# Libraries a variant loads with dlopen (no DT_NEEDED names them), looked up like DT_NEEDED:
# Nix preloads the NSS modules (glibc keeps stubs of them).
DLOPENED = {"base": (), "nix": ("libnss_dns.so.2", "libnss_files.so.2")}

# Names that are the one `nix` binary (it dispatches on argv[0]).
NIX_LINKS = ("nix-build", "nix-channel", "nix-collect-garbage", "nix-copy-closure", "nix-daemon",
             "nix-env", "nix-hash", "nix-instantiate", "nix-prefetch-url", "nix-shell", "nix-store")

# Debian 13 is merged-/usr; the packages ship under usr/ only and the loader path
# (/lib64/ld-linux-x86-64.so.2, /lib/ld-linux-aarch64.so.1) goes through these links.
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def elf_roots(variant: str) -> list[str]:
    return [p for p in SHIP[variant] if not p.startswith("etc/")]
