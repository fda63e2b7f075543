"""ELF dynamic dependencies (DT_NEEDED) and their closure inside an unpacked tree.

Libraries are looked up the way ld.so would in the guest: the binary's RUNPATH/RPATH, then the
multiarch and plain lib dirs. Only files of the tree count: the host's libraries never do.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from virby.guestbuild.deb import Tree


class MissingLibrary(Exception):
    pass


@dataclass(frozen=True)
class Dynamic:
    needed: tuple[str, ...]
    soname: str | None
    runpath: tuple[str, ...]
    interp: str | None


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def dynamic(data: bytes) -> Dynamic:
    """What `data` (an ELF file) asks of the dynamic linker."""
    try:
        elf = ELFFile(io.BytesIO(data))
        needed: list[str] = []
        soname = None
        runpath: list[str] = []
        interp = None
        seg: Any
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()
        for sec in elf.iter_sections():
            if not isinstance(sec, DynamicSection):
                continue
            tag: Any  # (pyelftools sets needed/soname/runpath per tag at run time)
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_SONAME":
                    soname = tag.soname
                elif tag.entry.d_tag in ("DT_RUNPATH", "DT_RPATH"):
                    path = tag.runpath if tag.entry.d_tag == "DT_RUNPATH" else tag.rpath
                    runpath += [p for p in path.split(":") if p]
        return Dynamic(tuple(needed), soname, tuple(runpath), interp)
    except (ELFError, ValueError, KeyError) as e:
        raise ValueError(f"not a readable ELF file: {e}") from e


def follow(tree: Tree, path: str) -> tuple[list[tuple[str, str]], str | None]:
    """Follow every symlink in `path` inside the tree: the links met on the way, each as
    (its path, its target), and the path they lead to, or None if that is not in the tree or
    the links loop."""
    links: list[tuple[str, str]] = []
    for _ in range(41):
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            node = tree.get(head)
            if node is None:
                if i == len(parts):
                    return links, None
                continue  # a directory the package did not list
            if node.kind == "link":
                links.append((head, node.target))
                base = "" if node.target.startswith("/") else posixpath.dirname(head)
                rest = posixpath.join("/", base, node.target, *parts[i:])
                path = posixpath.normpath(rest).lstrip("/")
                break
        else:
            return links, path
    return links, None  # too many levels of symlinks


def resolve_link(tree: Tree, path: str) -> str | None:
    """`path` with every symlink in it followed inside the tree, or None if it leads nowhere."""
    return follow(tree, path)[1]


def lib_dirs(multiarch: str) -> list[str]:
    return [f"usr/lib/{multiarch}", f"lib/{multiarch}", "usr/lib", "lib", "usr/lib64", "lib64"]


def find_library(tree: Tree, name: str, runpath: tuple[str, ...], multiarch: str) -> str | None:
    """The tree path the loader would open for DT_NEEDED `name` (symlinks kept as named)."""
    dirs = [p.replace("$ORIGIN", "").strip("/") for p in runpath] + lib_dirs(multiarch)
    for d in dirs:
        path = f"{d}/{name}"
        real = resolve_link(tree, path)
        if real is not None and tree[real].kind == "file":
            return path
    return None


def _walk(tree: Tree, roots: list[str], multiarch: str) -> tuple[set[str], list[tuple[str | None, str]]]:
    """The paths `roots` reach through ELF loaders and DT_NEEDED, and what they miss: (the
    missing soname or loader name, or None for a root not in the tree; why, in one line)."""
    seen: set[str] = set()
    missing: list[tuple[str | None, str]] = []
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        real = resolve_link(tree, path)
        if real is None:
            missing.append((None, f"{path} is not in the tree"))
            continue
        data = tree[real].data
        if not is_elf(data):
            continue
        dyn = dynamic(data)
        if dyn.interp:
            interp = dyn.interp.lstrip("/")
            if resolve_link(tree, interp) is None:
                why = f"{path}: its loader /{interp} is not in the tree"
                missing.append((posixpath.basename(interp), why))
            else:
                todo.append(interp)
        for name in dyn.needed:
            lib = find_library(tree, name, dyn.runpath, multiarch)
            if lib is None:
                missing.append((name, f"{path} needs {name}, which no package in the tree has"))
            else:
                todo.append(lib)
    return seen, missing


def closure(tree: Tree, roots: list[str], multiarch: str) -> list[str]:
    """Every tree path `roots` need at run time: the roots, their ELF interpreter and the
    DT_NEEDED closure (as named paths; symlinks are kept by the caller). Sorted. Raises
    MissingLibrary naming the first thing missing."""
    seen, missing = _walk(tree, roots, multiarch)
    if missing:
        raise MissingLibrary(missing[0][1])
    return sorted(seen)


def missing_sonames(tree: Tree, roots: list[str], multiarch: str) -> set[str]:
    """The DT_NEEDED names in `roots`' closure that the tree cannot satisfy (for the locker)."""
    return {name for name, _ in _walk(tree, roots, multiarch)[1] if name is not None}
