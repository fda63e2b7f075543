"""Virby's Linux guests, built from a lock file of Debian packages on any host (no apt, dpkg,
cpio or root): `build()` makes DIR/{vmlinuz,initrd.img,manifest.json}; `locker.make_lock`
refreshes image/guest.lock.json from Debian's indexes."""

from virby.supervisor.guest.builder import BuildError, build, default_out

__all__ = ["BuildError", "build", "default_out"]
