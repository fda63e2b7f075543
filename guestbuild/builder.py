"""`virby guest build`: a lock + image/guest/ -> DIR/{vmlinuz, initrd.img, manifest.json}.

Deterministic: the same lock and scripts give the same bytes (sorted cpio, mtime 0, gzip
without a name or time). Cached: when DIR/manifest.json names the same inputs the build is
skipped. Safe: DIR/.lock serialises builds into one DIR, files are replaced by rename, the
manifest last, and a failure leaves the previous guest (or nothing) in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from virby.core.cpio import newc_archive
from virby.core.files import write_atomic
from virby.guestbuild import assemble, deb, fetch, mirrors
from virby.guestbuild.lock import ArchLock, Lock, LockError, Package, load
from virby.guestbuild.report import Report
from virby.guestbuild.spec import ARCHES, DEFAULT_LOCK, GUEST_DIR, GUEST_REQUIRED, VARIANTS

GUEST_SCRIPTS = GUEST_DIR
ARM64_MAGIC = b"ARM\x64"  # at offset 0x38 of an uncompressed arm64 Image


class BuildError(Exception):
    """One line for the user."""


def cache_home() -> Path:
    value = os.environ.get("XDG_CACHE_HOME")
    return Path(value) if value and os.path.isabs(value) else Path.home() / ".cache"


def default_out(arch: str, variant: str) -> Path:
    return cache_home() / "virby" / "guests" / f"{arch}-{variant}"


def default_cache() -> Path:
    return cache_home() / "virby" / "debs"


def check_guest_dir(guest_dir: Path, variant: str) -> None:
    """Refuse to build without the guest's own files (image/guest/): the packages alone make an
    initramfs with no init scripts, which boots to nothing."""
    if not guest_dir.is_dir():
        problem = f"no directory {guest_dir}"
    else:
        missing = [r for r in GUEST_REQUIRED if not (guest_dir / r).is_file()]
        if variant != "base" and not (guest_dir / variant).is_dir():
            missing.append(f"{variant}/")
        if not missing:
            return
        problem = f"{guest_dir} has no {', '.join(missing)}"
    raise BuildError(f"the guest's files (init, rc, agent: image/guest/ of Virby's source) are "
                     f"missing: {problem}. Reinstall Virby (its package carries them in "
                     f"virby/image/guest/), or run `virby guest build` from a checkout")


def inputs_digest(lock: Lock, arch: str, variant: str, guest_dir: Path) -> str:
    """What the output depends on: the lock, the scripts, this builder's code."""
    h = hashlib.sha256(f"{lock.sha256} {arch} {variant}\n".encode())
    code = Path(__file__).resolve().parent
    for root in (guest_dir, code):
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".pyc"):
            h.update(f"{f.relative_to(root)} {os.access(f, os.X_OK)}\n".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def up_to_date(out: Path, digest: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("inputs") != digest:
        return False
    for name in ("vmlinuz", "initrd.img"):
        try:
            if fetch.sha256_file(out / name) != manifest.get("sha256", {}).get(name):
                return False
        except OSError:
            return False
    return True


def fetch_all(pkgs: list[Package], cache: Path, mirror: str | None, offline: bool,
              report: Report) -> dict[str, Path]:
    """Every package's cache file, downloading what is missing (unless offline)."""
    paths: dict[str, Path] = {}
    todo: list[Package] = []
    for p in pkgs:
        try:
            path = fetch.cached(cache, p.sha256, p.size, f"{p.name} {p.version}")
        except fetch.FetchError as e:
            raise BuildError(f"{e} ({p.urls[0]})") from e
        if path is not None:
            paths[p.name] = path
        elif offline:
            raise BuildError(f"{p.name} {p.version}: not in the cache {fetch.cache_path(cache, p.sha256)}"
                             f" and --offline ({p.urls[0]})")
        else:
            todo.append(p)
    if not todo:
        return paths
    try:
        bases = mirrors.bases(mirror)
    except mirrors.MirrorError as e:
        raise BuildError(str(e)) from e
    total = sum(p.size for p in todo)
    report.step(f"downloading {len(todo)} of {len(pkgs)} packages ({total / 1e6:.1f} MB)")
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        report.tick(done, total, "MB")

    for p in todo:
        urls = [u for u in (mirrors.resolve(x, bases) for x in p.urls) if u]
        if not urls:
            raise BuildError(f"{p.name} {p.version}: no usable URL ({', '.join(p.urls)})")
        try:
            paths[p.name] = fetch.download(urls, cache, p.sha256, p.size, f"{p.name} {p.version}",
                                           progress)
        except fetch.FetchError as e:
            raise BuildError(str(e)) from e
    return paths


def kernel_image(data: bytes, arch: str) -> bytes:
    """The kernel as the hypervisor wants it: a bzImage on x86_64, the uncompressed ARM64
    Image on aarch64 (vfkit cannot boot a compressed one)."""
    if arch == "aarch64":
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if data[0x38:0x3C] != ARM64_MAGIC:
            raise BuildError("the arm64 kernel image is not an uncompressed ARM64 Image")
    elif data[0x202:0x206] != b"HdrS":
        raise BuildError("the x86_64 kernel image is not a bzImage")
    return data


def assemble_guest(lock: Lock, arch: str, variant: str, debs: dict[str, Path],
                   guest_dir: Path, report: Report) -> tuple[bytes, bytes]:
    al: ArchLock = lock.arches[arch]
    pkgs = al.for_variant(variant)
    report.step(f"unpacking {len(pkgs)} packages")
    tree: deb.Tree = {}
    for i, p in enumerate(pkgs):
        try:
            deb.unpack(debs[p.name].read_bytes(), tree)
        except deb.DebError as e:
            raise BuildError(f"{p.name} {p.version}: {e} ({debs[p.name]})") from e
        report.tick(i + 1, len(pkgs))
    k = al.kernel
    if k.image not in tree:
        raise BuildError(f"{k.package} {k.version}: no {k.image} in the package ({k.package})")
    vmlinuz = kernel_image(tree[k.image].data, arch)
    report.step(f"assembling the {variant} root tree")
    try:
        entries = assemble.rootfs(tree, arch, variant, k.modules, guest_dir)
    except assemble.AssembleError as e:
        raise BuildError(f"{arch} {variant}: {e}") from e
    report.step("packing the initramfs")
    initrd = gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)
    return vmlinuz, initrd


def build(arch: str, variant: str, out: Path | None = None, *, cache: Path | None = None,
          mirror: str | None = None, offline: bool = False, progress: Report | None = None,
          lock_path: Path = DEFAULT_LOCK, guest_dir: Path | None = None) -> Path:
    """Build (or find up to date) the guest; return its directory. Raises BuildError."""
    if arch not in ARCHES or variant not in VARIANTS:
        raise BuildError(f"unknown arch/variant {arch}/{variant}")
    guest_dir = GUEST_SCRIPTS if guest_dir is None else guest_dir
    check_guest_dir(guest_dir, variant)
    report = progress or Report()
    try:
        lock = load(lock_path)
    except LockError as e:
        raise BuildError(str(e)) from e
    if arch not in lock.arches:
        raise BuildError(f"the lock {lock_path} has no {arch}")
    out = Path(out) if out else default_out(arch, variant)
    cache = Path(cache) if cache else default_cache()
    out.mkdir(parents=True, exist_ok=True)
    digest = inputs_digest(lock, arch, variant, guest_dir)
    with locked(out):
        if up_to_date(out, digest):
            report.say(f"guest up to date: {out}")
            return out
        ok = False
        try:
            pkgs = lock.arches[arch].for_variant(variant)
            debs = fetch_all(pkgs, cache, mirror, offline, report)
            vmlinuz, initrd = assemble_guest(lock, arch, variant, debs, guest_dir, report)
            report.step("writing")
            with contextlib.suppress(FileNotFoundError):
                (out / "manifest.json").unlink()  # the guest is incomplete until it is back
            write_atomic(str(out / "vmlinuz"), vmlinuz)
            write_atomic(str(out / "initrd.img"), initrd)
            manifest = {
                "arch": arch, "variant": variant, "inputs": digest, "lock": lock.sha256,
                "suite": lock.suite, "kernel": lock.arches[arch].kernel.version,
                "kernelPackage": lock.arches[arch].kernel.package,
                "packages": [f"{p.name}={p.version}" for p in pkgs],
                "sha256": {"vmlinuz": hashlib.sha256(vmlinuz).hexdigest(),
                           "initrd.img": hashlib.sha256(initrd).hexdigest()},
                "size": {"vmlinuz": len(vmlinuz), "initrd.img": len(initrd)},
            }
            write_atomic(str(out / "manifest.json"), (json.dumps(manifest, indent=1) + "\n").encode())
            ok = True
        finally:
            report.end(ok)
    report.say(f"guest: {out} (vmlinuz {len(vmlinuz)} bytes, initrd.img {len(initrd)} bytes)")
    return out
