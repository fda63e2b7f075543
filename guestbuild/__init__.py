"""Virby's Linux guests, built from a lock file of Debian packages on any host (no apt, dpkg,
cpio or root): `build()` makes DIR/{vmlinuz,initrd.img,manifest.json}; `locker.make_lock`
refreshes image/guest.lock.json from Debian's indexes.

The builder is imported on first use: every `virby` command mounts the `guest` group, and
`virby status` must not pay ~100 ms for ELF and archive code it never runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virby.guestbuild.builder import BuildError, build, default_out

__all__ = ["BuildError", "build", "default_out"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from virby.guestbuild import builder

        return getattr(builder, name)
    raise AttributeError(name)
