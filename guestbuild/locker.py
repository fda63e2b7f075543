"""`virby guest lock`: refresh image/guest.lock.json from Debian's Packages indexes.

For each arch: the newest version of each package over trixie main and trixie-security, the
concrete kernel behind `linux-image-cloud-<arch>`, and only the packages whose files the guest
runs: the ELF DT_NEEDED closure of the shipped binaries, found by downloading the candidates
their Depends name (transitively) and looking inside, never the whole Depends (perl, curl…).
"""

from __future__ import annotations

import lzma
import time
from collections.abc import Callable
from pathlib import Path

from virby.guestbuild import deb, debindex, elfdeps, fetch, mirrors
from virby.guestbuild.lock import ArchLock, Kernel, Lock, Package
from virby.guestbuild.spec import ARCHES, MERGED_USR, ROOT_PACKAGES, SUITE, VARIANTS, elf_roots

ARCHIVES = (("debian", SUITE, "main"), ("debian-security", f"{SUITE}-security", "security"))
MAX_DEPTH = 6

Say = Callable[[str], None]


class LockerError(Exception):
    pass


def fetch_index(bases: dict[str, str], deb_arch: str, say: Say) -> debindex.Index:
    stanzas = []
    for archive, suite, origin in ARCHIVES:
        url = f"{bases[archive]}/dists/{suite}/main/binary-{deb_arch}/Packages.xz"
        say(f"index {url}")
        try:
            text = lzma.decompress(fetch.get_bytes(url)).decode()
        except fetch.FetchError as e:
            raise LockerError(f"Packages index: {e} at {url}") from e
        except lzma.LZMAError as e:
            raise LockerError(f"Packages index: corrupt xz ({e}) at {url}") from e
        stanzas += debindex.parse(text, origin)
    return debindex.Index(stanzas)


def lock_urls(s: debindex.Stanza, snapshot: str) -> tuple[str, ...]:
    archive = "debian-security" if s.origin == "security" else "debian"
    return (f"mirror://{archive}/{s.path}", f"snapshot://{archive}/{snapshot}/{s.path}")


class Unpacker:
    """Downloads (cached by sha256) and unpacks index stanzas, remembering each tree."""

    def __init__(self, bases: dict[str, str], cache: Path, say: Say) -> None:
        self.bases, self.cache, self.say = bases, cache, say
        self.trees: dict[str, deb.Tree] = {}

    def tree(self, s: debindex.Stanza) -> deb.Tree:
        if s.name not in self.trees:
            urls = [mirrors.resolve(u, self.bases) for u in lock_urls(s, "")[:1]]
            path = fetch.download([u for u in urls if u], self.cache, s.sha256, s.size,
                                  f"{s.name} {s.version}")
            self.trees[s.name] = deb.unpack(path.read_bytes())
        return self.trees[s.name]


def provides(tree: deb.Tree, names: set[str]) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p, n in tree.items()
            if n.kind != "dir" and p.rsplit("/", 1)[-1] in names}


def package_closure(index: debindex.Index, roots: tuple[str, ...], variant: str, multiarch: str,
                    unpacker: Unpacker) -> set[str]:
    """The names of the packages the variant's shipped binaries need at run time."""
    chosen = set(roots)
    tree: deb.Tree = {k: deb.Node("link", v.encode()) for k, v in MERGED_USR.items()}
    for name in sorted(chosen):
        tree.update(unpacker.tree(index.get(name)))
    ship = [p for p in elf_roots(variant) if p in tree]
    examined = set(chosen)
    frontier = set(chosen)
    for _ in range(MAX_DEPTH):
        missing = elfdeps.missing_sonames(tree, ship, multiarch)
        if not missing:
            return chosen
        deps = sorted({d for n in frontier for d in index.get(n).depends
                       if d in index and index.get(d).name not in examined})
        frontier = set()
        for d in deps:
            s = index.get(d)
            examined.add(s.name)
            frontier.add(s.name)
            if provides(unpacker.tree(s), missing):
                chosen.add(s.name)
                tree.update(unpacker.tree(s))
                missing = elfdeps.missing_sonames(tree, ship, multiarch)
    missing = elfdeps.missing_sonames(tree, ship, multiarch)
    if missing:
        raise LockerError(f"{variant}: no package in the Depends of {', '.join(sorted(roots))} "
                          f"has {', '.join(sorted(missing))}")
    return chosen


def make_lock(cache: Path, mirror: str | None = None, arches: tuple[str, ...] = tuple(ARCHES),
              say: Say = lambda s: None) -> Lock:
    bases = mirrors.bases(mirror)
    snapshot = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = {}
    for arch in arches:
        spec = ARCHES[arch]
        index = fetch_index(bases, spec.deb_arch, say)
        where = f"{bases['debian']}/dists/{SUITE}/main/binary-{spec.deb_arch}/Packages.xz"
        try:
            meta = index.get(spec.kernel_meta)
        except KeyError as e:
            raise LockerError(f"{spec.kernel_meta} is not in the {SUITE} index ({where})") from e
        kpkg = next((d for d in meta.depends if d.startswith("linux-image-")), None)
        if kpkg is None or kpkg not in index:
            raise LockerError(f"{spec.kernel_meta} {meta.version} names no kernel package")
        kernel = index.get(kpkg)
        release = kernel.name.removeprefix("linux-image-")
        unpacker = Unpacker(bases, cache, say)
        variants: dict[str, set[str]] = {kernel.name: set(VARIANTS)}
        for variant in VARIANTS:
            for root in ROOT_PACKAGES[variant]:
                if root not in index:
                    raise LockerError(f"{root} is not in the {SUITE} {spec.deb_arch} index ({where})")
            say(f"{arch} {variant}: resolving the library closure")
            for name in package_closure(index, ROOT_PACKAGES[variant], variant, spec.multiarch,
                                        unpacker):
                variants.setdefault(index.get(name).name, set()).add(variant)
        pkgs = []
        for name in sorted(variants):
            s = index.get(name)
            pkgs.append(Package(s.name, s.version, s.arch, s.path, lock_urls(s, snapshot),
                                s.sha256, s.size, tuple(v for v in VARIANTS if v in variants[name])))
        out[arch] = ArchLock(spec.deb_arch, Kernel(kernel.name, kernel.version,
                                                   f"boot/vmlinuz-{release}",
                                                   f"usr/lib/modules/{release}"), tuple(pkgs))
    return Lock(SUITE, snapshot, out)
