"""Synthetic inputs for the guest builder's unit tests: tiny ELF files, tiny .debs, a fake
Debian archive (pool + Packages.xz) and a lock for it, served by an http.server thread."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import lzma
import struct
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import zstandard

from virby.guestbuild.spec import ARCHES


def make_elf(needed: tuple[str, ...] = (), *, soname: str | None = None,
             interp: str | None = None, runpath: str | None = None, extra: bytes = b"") -> bytes:
    """A minimal ELF64 (x86_64) with a dynamic section: enough for a reader of DT_NEEDED."""
    dynstr = b"\0"
    offsets = {}
    for s in (*needed, *(x for x in (soname, runpath) if x)):
        offsets[s] = len(dynstr)
        dynstr += s.encode() + b"\0"
    dyn = b"".join(struct.pack("<qQ", 1, offsets[n]) for n in needed)  # DT_NEEDED
    if soname:
        dyn += struct.pack("<qQ", 14, offsets[soname])
    if runpath:
        dyn += struct.pack("<qQ", 29, offsets[runpath])
    dyn += struct.pack("<qQ", 0, 0)
    shstr = b"\0.dynstr\0.dynamic\0.shstrtab\0"
    interp_b = (interp.encode() + b"\0") if interp else b""
    phnum = 2 if interp else 1
    off = 64 + 56 * phnum
    o_interp = off
    o_dynstr = o_interp + len(interp_b)
    o_dyn = o_dynstr + len(dynstr)
    o_dyn += (-o_dyn) % 8
    o_shstr = o_dyn + len(dyn)
    o_extra = o_shstr + len(shstr)
    o_sh = o_extra + len(extra)
    o_sh += (-o_sh) % 8
    ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, o_sh, 0, 64, 56, phnum, 64, 4, 3)
    ph = b""
    if interp:
        ph += struct.pack("<IIQQQQQQ", 3, 4, o_interp, o_interp, o_interp, len(interp_b),
                          len(interp_b), 1)
    ph += struct.pack("<IIQQQQQQ", 2, 6, o_dyn, o_dyn, o_dyn, len(dyn), len(dyn), 8)
    body = bytearray(ehdr + ph + interp_b + dynstr)
    body += b"\0" * (o_dyn - len(body)) + dyn + shstr + extra
    body += b"\0" * (o_sh - len(body))
    sh = b"\0" * 64
    sh += struct.pack("<IIQQQQIIQQ", 1, 3, 2, o_dynstr, o_dynstr, len(dynstr), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 9, 6, 3, o_dyn, o_dyn, len(dyn), 1, 0, 8, 16)
    sh += struct.pack("<IIQQQQIIQQ", 18, 3, 0, 0, o_shstr, len(shstr), 0, 0, 1, 0)
    return bytes(body + sh)


@dataclass
class F:
    """A file, a symlink (`link`) or a directory (`dir`) inside a .deb."""

    data: bytes = b""
    mode: int = 0o644
    link: str | None = None
    dir: bool = False


def make_deb(files: dict[str, F], compression: str = "xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(files):
            f = files[path]
            info = tarfile.TarInfo("./" + path)
            info.mode = f.mode
            if f.dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif f.link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, f.link
                tar.addfile(info)
            else:
                info.size = len(f.data)
                tar.addfile(info, io.BytesIO(f.data))
    raw = buf.getvalue()
    data = {"xz": lambda b: lzma.compress(b), "zst": lambda b: zstandard.ZstdCompressor().compress(b),
            "gz": lambda b: __import__("gzip").compress(b, mtime=0)}[compression](raw)
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               (f"data.tar.{compression}", data)]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        if len(body) % 2:
            out += b"\n"
    return out


def busybox_binary() -> bytes:
    applets = sorted(["[", "[[", "sh", "ash", "mount", "umount", "insmod", "ip", "cat", "cp",
                      "chmod", "chown", "grep", "cut", "mkdir", "hostname", "sleep", "stty",
                      "usleep", "date", "sync", "poweroff", "acpid", "init", "echo", "ls", "ln",
                      "rm", "mv", "awk", "df", "blkid", "mountpoint", "id", "stat", "uname",
                      "env", "test", "true", "false", "head", "tail", "sed", "sort", "uniq",
                      "wc", "tr", "find", "xargs", "touch", "readlink", "dirname", "basename"])
    return make_elf(extra=b"x\0" + b"\0".join(a.encode() for a in applets) + b"\0\0")


def kernel_files(release: str, arch: str = "x86_64") -> dict[str, F]:
    """A kernel package: an image with the right magic, every wanted module built in but
    `button` (a .ko.xz that depends on evdev, also a file)."""
    if arch == "x86_64":
        image = bytearray(0x400)
        image[0x202:0x206] = b"HdrS"
    else:
        image = bytearray(0x100)
        image[0x38:0x3C] = b"ARM\x64"
    mdir = f"usr/lib/modules/{release}"
    wanted = (*ARCHES[arch].modules, "virtio_blk", "ext4", "crc32c_generic")
    builtin = "".join(f"kernel/drivers/x/{m}.ko\n" for m in wanted if m not in ("button", "evdev"))
    return {
        f"boot/vmlinuz-{release}": F(bytes(image)),
        f"{mdir}/modules.builtin": F(builtin.encode()),
        f"{mdir}/kernel/drivers/input/evdev.ko.xz": F(lzma.compress(b"\0name=evdev\0depends=\0")),
        f"{mdir}/kernel/drivers/acpi/button.ko.xz": F(lzma.compress(b"\0depends=evdev\0name=button\0")),
    }


LIBDIR = "usr/lib/x86_64-linux-gnu"


def fake_packages(release: str = "6.12.0-test-cloud-amd64") -> dict[str, dict[str, F]]:
    loader = make_elf(soname="ld-linux-x86-64.so.2")
    return {
        "busybox-static": {"usr/bin/busybox": F(busybox_binary(), 0o755)},
        "dropbear-bin": {"usr/sbin/dropbear": F(make_elf(("libtomcrypt.so.1", "libc.so.6"),
                                                         interp="/lib64/ld-linux-x86-64.so.2"), 0o755)},
        "libtomcrypt1": {f"{LIBDIR}/libtomcrypt.so.1.0.1": F(make_elf(("libc.so.6",),
                                                                      soname="libtomcrypt.so.1")),
                         f"{LIBDIR}/libtomcrypt.so.1": F(link="libtomcrypt.so.1.0.1")},
        "libc6": {f"{LIBDIR}/libc.so.6": F(make_elf(soname="libc.so.6")),
                  f"{LIBDIR}/ld-linux-x86-64.so.2": F(loader, 0o755),
                  "usr/lib64/ld-linux-x86-64.so.2": F(link="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                  "usr/share/doc/libc6/copyright": F(b"not shipped")},
        "perl": {"usr/bin/perl": F(make_elf(("libc.so.6",)), 0o755)},
        f"linux-image-{release}": kernel_files(release),
    }


@dataclass
class Archive:
    """A fake Debian archive on disk: pool files, Packages.xz, and a lock pointing at them."""

    root: Path
    debs: dict[str, bytes] = field(default_factory=dict)
    release: str = "6.12.0-test-cloud-amd64"

    def path(self, name: str) -> str:
        return f"pool/main/{name[0]}/{name}/{name}_1.0_amd64.deb"

    def write(self) -> None:
        stanzas = []
        for name, files in fake_packages(self.release).items():
            blob = make_deb(files, "zst" if name == "libc6" else "xz")
            self.debs[name] = blob
            p = self.root / "debian" / self.path(name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
            deps = {"dropbear-bin": "libc6 (>= 2.38), libtomcrypt1", "libtomcrypt1": "libc6",
                    "busybox-static": "", "libc6": "perl"}.get(name, "")
            stanzas.append(f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n"
                           + (f"Depends: {deps}\n" if deps else "")
                           + f"Filename: {self.path(name)}\nSize: {len(blob)}\n"
                           f"SHA256: {hashlib.sha256(blob).hexdigest()}\n")
        stanzas.append(f"Package: linux-image-cloud-amd64\nVersion: 1.0\nArchitecture: amd64\n"
                       f"Depends: linux-image-{self.release} (= 1.0)\nFilename: pool/x.deb\n"
                       "Size: 1\nSHA256: " + "0" * 64 + "\n")
        index = self.root / "debian/dists/trixie/main/binary-amd64/Packages.xz"
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_bytes(lzma.compress("\n".join(stanzas).encode()))
        sec = self.root / "debian-security/dists/trixie-security/main/binary-amd64/Packages.xz"
        sec.parent.mkdir(parents=True, exist_ok=True)
        sec.write_bytes(lzma.compress(b""))

    def lock(self, names: tuple[str, ...] = ("busybox-static", "dropbear-bin", "libc6",
                                             "libtomcrypt1")) -> dict:
        kernel = f"linux-image-{self.release}"
        pkgs = [{"name": n, "version": "1.0", "arch": "amd64", "path": self.path(n),
                 "urls": [f"mirror://debian/{self.path(n)}"],
                 "sha256": hashlib.sha256(self.debs[n]).hexdigest(), "size": len(self.debs[n]),
                 "variants": ["base"]} for n in sorted((*names, kernel))]
        return {"version": 1, "suite": "trixie", "snapshot": "20261201T000000Z",
                "arches": {"x86_64": {"debArch": "amd64", "kernel": {
                    "package": kernel, "version": "1.0", "image": f"boot/vmlinuz-{self.release}",
                    "modules": f"usr/lib/modules/{self.release}"}, "packages": pkgs}}}

    def write_lock(self, path: Path, **kw: object) -> Path:
        path.write_text(json.dumps(self.lock(**kw)))  # type: ignore[arg-type]
        return path


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate: ClassVar[set[str]] = set()  # paths served with their last bytes cut off

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.split("?")[0] in self.truncate:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, set[str]]]:
    """(base URL, set of paths to truncate) for an HTTP server thread serving `root`."""
    truncate: set[str] = set()
    handler = type("H", (_Handler,), {"truncate": truncate})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", truncate
    finally:
        server.shutdown()
        server.server_close()
        t.join()
