"""The guest's root tree, from the unpacked packages, the scripts in image/guest/ and the kernel
modules, as sorted cpio entries (owner root unless said otherwise, mtime 0)."""

from __future__ import annotations

import re
from pathlib import Path

from virby.core.cpio import CpioEntry
from virby.guestbuild import elfdeps, modules
from virby.guestbuild.deb import Node, Tree
from virby.guestbuild.spec import (
    ARCHES,
    CA_BUNDLE,
    CA_SOURCE,
    DLOPENED,
    MERGED_USR,
    NIX_LINKS,
    SHIP,
    VARIANT_MODULES,
    elf_roots,
)

BUILDER_UID = 1000
DIRS = {  # path -> mode
    "proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777, "var/log": 0o755,
    "root": 0o700, "home/builder": 0o755, "etc/virby": 0o755, "usr/bin": 0o755,
    "usr/sbin": 0o755, "usr/lib/modules": 0o755, "mnt": 0o755,
}
MODES = {"etc/shadow": 0o600}  # overlay files whose mode is not just 0755/0644
_APPLET = re.compile(rb"[a-z0-9_.\[-]{1,32}")


class AssembleError(Exception):
    pass


def busybox_applets(data: bytes) -> list[str]:
    """The applet names compiled into a busybox binary, read from its packed name table
    ("[\\0[[\\0acpid\\0…", sorted): found without running it (it may be another arch)."""
    start = data.find(b"[\0[[\0")
    if start < 0:
        raise AssembleError("busybox: no applet name table found")
    names = []
    for raw in data[start:start + 65536].split(b"\0"):
        if not _APPLET.fullmatch(raw):
            break
        names.append(raw.decode())
    if len(names) < 50 or names != sorted(names):
        raise AssembleError(f"busybox: the applet table looks wrong ({len(names)} names)")
    return names


class Image:
    """Collects entries by path; the first writer of a path wins, a conflicting one fails."""

    def __init__(self) -> None:
        self.entries: dict[str, CpioEntry] = {}

    def add(self, entry: CpioEntry) -> None:
        old = self.entries.get(entry.path)
        if old is not None and old != entry:
            raise AssembleError(f"two different {entry.path} in the image")
        self.entries[entry.path] = entry

    def dir(self, path: str, mode: int = 0o755, uid: int = 0) -> None:
        self.add(CpioEntry(path, mode=mode, uid=uid, gid=uid, directory=True))

    def link(self, path: str, target: str) -> None:
        self.add(CpioEntry(path, data=target.encode(), mode=0o777, symlink=True))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.add(CpioEntry(path, data=data, mode=mode))

    def copy(self, tree: Tree, path: str) -> None:
        """`path` from the package tree, with every symlink on the way and the final target."""
        links, real = elfdeps.follow(tree, path)
        for head, target in links:
            self.link(head, target)
        if real is None:
            raise AssembleError(f"{path}: not in the packages (or its symlinks loop)")
        node = tree[real]
        if node.kind == "file":
            self.file(real, node.data, 0o755 if node.mode & 0o111 else 0o644)
        elif node.kind == "dir":
            self.dir(real)

    def sorted(self) -> list[CpioEntry]:
        return [self.entries[p] for p in sorted(self.entries)]


def overlay(image: Image, roots: list[Path]) -> None:
    """The guest's own files; a file in a later root (the variant's) replaces the same path in
    an earlier one (common/): the nix variant's inittab and init."""
    files: dict[str, Path] = {}
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            files[f.relative_to(root).as_posix()] = f
    for rel, f in sorted(files.items()):
        mode = MODES.get(rel, 0o755 if f.stat().st_mode & 0o111 else 0o644)
        image.file(rel, f.read_bytes(), mode)


def ca_bundle(tree: Tree, source: str) -> bytes:
    """What update-ca-certificates writes at install time from Debian's ca-certificates: every
    shipped certificate, in path order (the package ships no bundle, its postinst makes it)."""
    certs = [n.data for p, n in sorted(tree.items())
             if p.startswith(source) and p.endswith(".crt") and n.kind == "file"]
    if not certs:
        raise AssembleError(f"no certificates under {source}")
    return b"".join(c if c.endswith(b"\n") else c + b"\n" for c in certs)


def rootfs(tree: Tree, arch: str, variant: str, modules_dir: str, guest_dir: Path) -> list[CpioEntry]:
    """Every entry of the guest's initramfs for `variant`, sorted by path."""
    spec = ARCHES[arch]
    tree = {**tree, **{k: Node("link", v.encode()) for k, v in MERGED_USR.items()}}
    img = Image()
    for path, target in MERGED_USR.items():
        img.link(path, target)
    for path, mode in DIRS.items():
        img.dir(path, mode, BUILDER_UID if path == "home/builder" else 0)
    img.link("var/run", "../run")
    roots = [guest_dir / "common"] + ([guest_dir / variant] if (guest_dir / variant).is_dir() else [])
    if not any((r / "init").is_file() for r in roots):
        img.link("init", "/bin/busybox")  # the kernel runs /init: busybox init reads /etc/inittab

    missing = [p for p in SHIP[variant] if elfdeps.resolve_link(tree, p) is None]
    if missing:
        raise AssembleError(f"the packages have no {', '.join(missing)}")
    dlopened = []
    for name in DLOPENED[variant]:
        lib = elfdeps.find_library(tree, name, (), spec.multiarch)
        if lib is None:
            raise AssembleError(f"no package has {name}")
        dlopened.append(lib)
    try:
        needed = elfdeps.closure(tree, elf_roots(variant) + dlopened, spec.multiarch)
    except elfdeps.MissingLibrary as e:
        raise AssembleError(str(e)) from e
    for path in sorted({*needed, *SHIP[variant]}):
        img.copy(tree, path)
    if variant == "nix":
        img.dir("nix", 0o755)  # multi-user: root's (etc/rc.d/nix-store.sh)
        # dropbear runs the sftp subsystem (scp, sftp) from its compiled-in path
        img.link("usr/lib/sftp-server", "openssh/sftp-server")
        for name in NIX_LINKS:
            # the variant's own files may stand in front of one (usr/bin/nix-daemon)
            if not any((r / "usr/bin" / name).is_file() for r in roots):
                img.link(f"usr/bin/{name}", "nix")
        img.link("usr/libexec/nix/build-remote", "../../bin/nix")
        img.link("usr/libexec/nix/nix-daemon", "../../bin/nix")  # Nix's own, by its name
        img.link("usr/sbin/mkfs.ext4", "mke2fs")

    busybox = tree[elfdeps.resolve_link(tree, "usr/bin/busybox") or ""].data
    for name in busybox_applets(busybox):
        if f"usr/bin/{name}" not in img.entries and f"usr/sbin/{name}" not in img.entries:
            img.link(f"usr/bin/{name}", "busybox")

    overlay(img, roots)
    ca_source = CA_SOURCE[variant]
    if ca_source:
        img.file(CA_BUNDLE, ca_bundle(tree, ca_source))

    try:
        mods = modules.select(tree, modules_dir, spec.modules + VARIANT_MODULES[variant])
    except modules.ModuleError as e:
        raise AssembleError(str(e)) from e
    for name, data in mods:
        img.file(f"usr/lib/modules/{name}", data)
    img.file("etc/modules.order", "".join(f"{n}\n" for n, _ in mods).encode())
    return img.sorted()
