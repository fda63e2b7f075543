"""Kernel modules for the initramfs: the wanted ones plus what their `depends=` name, in an order
where each comes after its dependencies (the guest has no kmod/depmod, only insmod). Debian 13
ships them as .ko.xz: they are decompressed here (busybox insmod reads plain .ko)."""

from __future__ import annotations

import lzma
import re

from virby.guestbuild.deb import Tree

_DEPENDS = re.compile(rb"(?:^|\0)depends=([A-Za-z0-9_,-]*)\0")


class ModuleError(Exception):
    pass


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _basename(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _load(data: bytes, path: str) -> bytes:
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".ko"):
        return data
    raise ModuleError(f"{path}: unsupported module compression")


def select(tree: Tree, modules_dir: str, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """[(file name "virtio_net.ko", bytes)] in load order."""
    files: dict[str, str] = {}
    for path, node in tree.items():
        if path.startswith(modules_dir + "/kernel/") and node.kind == "file" and ".ko" in path:
            files[_norm(_basename(path))] = path
    builtin_path = f"{modules_dir}/modules.builtin"
    if builtin_path not in tree:
        raise ModuleError(f"the kernel package has no {builtin_path}")
    builtin = {_norm(_basename(line)) for line in tree[builtin_path].data.decode().split()}

    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        n = _norm(name)
        if n in done or n in builtin:
            return
        if n in chain:
            raise ModuleError(f"module dependency cycle: {' -> '.join((*chain, n))}")
        if n not in files:
            raise ModuleError(f"kernel has no module {name} (neither a file nor built in)")
        data = _load(tree[files[n]].data, files[n])
        m = _DEPENDS.search(data)
        for dep in sorted(filter(None, (m.group(1).decode() if m else "").split(","))):
            add(dep, (*chain, n))
        done.add(n)
        order.append((_basename(files[n]) + ".ko", data))

    for name in wanted:
        add(name, ())
    return order
