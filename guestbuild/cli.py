"""`virby guest build` and `virby guest lock` (a click group supervisor/cli.py mounts)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from virby.guestbuild.spec import ARCHES, DEFAULT_LOCK, VARIANTS


def _host_arch() -> str:
    import platform

    machine = platform.machine().lower()
    return "aarch64" if machine in ("arm64", "aarch64") else "x86_64"


@click.group("guest")
def guest() -> None:
    """Build the Linux guest from a lock file of Debian packages, on any host.

    \b
    Examples:
      virby guest build                        # this host's arch, the nix variant
      virby guest build --arch aarch64 --variant base --out /tmp/g
      virby guest lock                         # refresh image/guest.lock.json
    """


@guest.command("build")
@click.option("--arch", type=click.Choice(sorted(ARCHES)), default=_host_arch, show_default="host")
@click.option("--variant", type=click.Choice(VARIANTS), default="nix", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Default: ${XDG_CACHE_HOME:-~/.cache}/virby/guests/<arch>-<variant>.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Downloaded .debs, by sha256. Default: ${XDG_CACHE_HOME:-~/.cache}/virby/debs.")
@click.option("--mirror", help="Debian mirror base URL. Default: $VIRBY_DEBIAN_MIRROR, else apt's.")
@click.option("--offline", is_flag=True, help="Fail instead of downloading a missing package.")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_LOCK, show_default=True)
def build_cmd(arch: str, variant: str, out: Path | None, cache: Path | None, mirror: str | None,
              offline: bool, lock_path: Path) -> None:
    """Download (verified, cached), unpack and pack the guest: DIR/vmlinuz, DIR/initrd.img,
    DIR/manifest.json. Prints DIR on stdout."""
    from virby.guestbuild.builder import BuildError, build

    try:
        out = build(arch, variant, out, cache=cache, mirror=mirror, offline=offline,
                    lock_path=lock_path)
    except BuildError as e:
        click.echo(f"virby: guest build failed: {e}", err=True)
        sys.exit(1)
    click.echo(str(out))


@guest.command("lock")
@click.option("--arch", "arches", multiple=True, type=click.Choice(sorted(ARCHES)),
              help="Only these arches (default: all).")
@click.option("--mirror", help="Debian mirror base URL. Default: $VIRBY_DEBIAN_MIRROR, else apt's.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "lock_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_LOCK, show_default=True)
def lock_cmd(arches: tuple[str, ...], mirror: str | None, cache: Path | None, lock_path: Path) -> None:
    """Resolve the newest trixie packages (main + security) and their ELF library closure, and
    write the lock. Downloads the candidate packages to look inside them."""
    from virby.core.files import write_atomic
    from virby.guestbuild import fetch, lock, locker, mirrors
    from virby.guestbuild.builder import default_cache

    try:
        new = locker.make_lock(cache or default_cache(), mirror, arches or tuple(ARCHES),
                               say=lambda s: click.echo(s, err=True))
    except (locker.LockerError, mirrors.MirrorError, fetch.FetchError) as e:
        click.echo(f"virby: guest lock failed: {e}", err=True)
        sys.exit(1)
    if arches and lock_path.exists():  # keep the other arches as they were
        old = lock.load(lock_path)
        new = lock.Lock(new.suite, new.snapshot, {**old.arches, **new.arches})
    write_atomic(str(lock_path), lock.dumps(new).encode())
    click.echo(str(lock_path))
