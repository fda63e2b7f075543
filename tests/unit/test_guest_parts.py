"""The guest builder's parts on synthetic inputs: lock parsing, .deb unpacking, the DT_NEEDED
closure, kernel module order, dpkg version order, mirror resolution."""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from tests.guestkit import LIBDIR, F, fake_packages, make_deb, make_elf
from virby.guestbuild import debindex, elfdeps, lock, mirrors, modules
from virby.guestbuild.deb import DebError, Node, Tree, unpack
from virby.guestbuild.lock import DEFAULT_LOCK, LockError

REAL_LOCK = DEFAULT_LOCK


def good_lock() -> dict:
    pkg = {"name": "busybox-static", "version": "1:1.37.0-6", "arch": "amd64",
           "path": "pool/main/b/busybox/busybox-static_1.37.0-6_amd64.deb",
           "urls": ["mirror://debian/pool/main/b/busybox/busybox-static_1.37.0-6_amd64.deb"],
           "sha256": "a" * 64, "size": 10, "variants": ["base", "nix"]}
    kpkg = {**pkg, "name": "linux-image-x", "variants": ["base"]}
    return {"version": 1, "suite": "trixie", "snapshot": "20261201T000000Z", "arches": {
        "x86_64": {"debArch": "amd64", "kernel": {"package": "linux-image-x", "version": "1",
                                                  "image": "boot/vmlinuz-x",
                                                  "modules": "usr/lib/modules/x"},
                   "packages": [pkg, kpkg]}}}


# -- lock -------------------------------------------------------------------------------------------


def test_a_lock_round_trips_and_splits_by_variant() -> None:
    parsed = lock.parse(json.dumps(good_lock()))
    x86 = parsed.arches["x86_64"]
    assert [p.name for p in x86.for_variant("nix")] == ["busybox-static"]
    assert [p.name for p in x86.for_variant("base")] == ["busybox-static", "linux-image-x"]
    again = lock.parse(lock.dumps(parsed))
    assert again.arches == parsed.arches and again.snapshot == parsed.snapshot


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(version=2), "reads version 1"),
    (lambda d: d["arches"]["x86_64"]["packages"][0].update(sha256="xyz"), "busybox-static).sha256"),
    (lambda d: d["arches"]["x86_64"]["packages"][0].update(variants=["big"]), "variants"),
    (lambda d: d["arches"]["x86_64"]["packages"][0].update(size="10"), "expected int"),
    (lambda d: d["arches"]["x86_64"]["packages"][0].update(path="/etc/passwd"), "relative"),
    (lambda d: d["arches"]["x86_64"]["packages"][0].update(urls=[]), "urls"),
    (lambda d: d["arches"]["x86_64"]["packages"].reverse(), "sorted by name"),
    (lambda d: d["arches"]["x86_64"]["kernel"].update(package="linux-image-y"), "not in the package list"),
    (lambda d: d["arches"].update(riscv64={}), "unknown arch"),
    (lambda d: d.pop("snapshot"), "missing 'snapshot'"),
])
def test_a_bad_lock_is_refused_with_the_field_named(change: Any, message: str) -> None:
    d = good_lock()
    change(d)
    with pytest.raises(LockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lock.parse(json.dumps(d))


def test_the_committed_lock_has_both_arches_and_variants() -> None:
    real = lock.load(REAL_LOCK)
    assert real.suite == "trixie"
    for arch, deb_arch in (("x86_64", "amd64"), ("aarch64", "arm64")):
        a = real.arches[arch]
        assert a.debArch == deb_arch and a.kernel.package.endswith(f"-cloud-{deb_arch}")
        base = {p.name for p in a.for_variant("base")}
        nix = {p.name for p in a.for_variant("nix")}
        assert {"busybox-static", "dropbear-bin", "libc6", a.kernel.package} <= base < nix
        assert {"nix-bin", "e2fsprogs"} <= nix
        assert "perl-base" not in nix and "perl" not in nix  # the ELF closure, not the Depends
        for p in a.packages:
            assert p.urls[0] == f"mirror://{p.urls[0].split('/')[2]}/{p.path}"
            assert p.urls[1].startswith("snapshot://")
            assert "deb.debian.org" not in " ".join(p.urls)


# -- .deb ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["xz", "zst", "gz"])
def test_a_deb_unpacks_in_memory(compression: str) -> None:
    blob = make_deb({"usr/bin/tool": F(b"#!/bin/sh\n", 0o755), "usr/lib": F(dir=True, mode=0o755),
                     "usr/bin/alias": F(link="tool")}, compression)
    tree = unpack(blob)
    assert tree["usr/bin/tool"] == Node("file", b"#!/bin/sh\n", 0o755)
    assert tree["usr/bin/alias"].kind == "link" and tree["usr/bin/alias"].target == "tool"
    assert tree["usr/lib"].kind == "dir"


def test_a_corrupt_deb_is_an_error_not_a_crash() -> None:
    blob = make_deb({"a": F(b"x" * 1000)})
    with pytest.raises(DebError, match="corrupt data archive"):
        unpack(blob[:-40] + b"\0" * 40)
    with pytest.raises(DebError, match="not an ar archive"):
        unpack(b"PK\3\4 not a deb")
    with pytest.raises(DebError, match="truncated"):
        unpack(blob[:len(blob) // 2])


# -- ELF closure --------------------------------------------------------------------------------------


def tree_of(*names: str) -> Tree:
    tree: Tree = {"lib64": Node("link", b"usr/lib64"), "lib": Node("link", b"usr/lib")}
    for name in names:
        tree.update(unpack(make_deb(fake_packages()[name])))
    return tree


def test_the_closure_follows_dt_needed_and_the_loader() -> None:
    tree = tree_of("dropbear-bin", "libtomcrypt1", "libc6", "perl")
    assert elfdeps.dynamic(tree["usr/sbin/dropbear"].data).needed == ("libtomcrypt.so.1", "libc.so.6")
    assert elfdeps.closure(tree, ["usr/sbin/dropbear"], "x86_64-linux-gnu") == [
        "lib64/ld-linux-x86-64.so.2", f"{LIBDIR}/libc.so.6", f"{LIBDIR}/libtomcrypt.so.1",
        "usr/sbin/dropbear"]


def test_a_missing_library_is_named() -> None:
    tree = tree_of("dropbear-bin", "libc6")
    assert elfdeps.missing_sonames(tree, ["usr/sbin/dropbear"], "x86_64-linux-gnu") == {"libtomcrypt.so.1"}
    with pytest.raises(elfdeps.MissingLibrary, match=r"needs libtomcrypt\.so\.1"):
        elfdeps.closure(tree, ["usr/sbin/dropbear"], "x86_64-linux-gnu")


def test_runpath_is_searched_first() -> None:
    tree: Tree = {"usr/bin/nix": Node("file", make_elf(("libnixutil.so",), runpath="/usr/lib/nix")),
                  "usr/lib/nix/libnixutil.so": Node("file", make_elf(soname="libnixutil.so"))}
    assert elfdeps.closure(tree, ["usr/bin/nix"], "x86_64-linux-gnu") == [
        "usr/bin/nix", "usr/lib/nix/libnixutil.so"]


# -- modules, versions, mirrors -------------------------------------------------------------------------


def test_modules_come_after_their_dependencies_and_builtins_are_skipped() -> None:
    d = "usr/lib/modules/6"
    tree: Tree = {
        f"{d}/modules.builtin": Node("file", b"kernel/drivers/virtio/virtio.ko\n"),
        f"{d}/kernel/a/button.ko.xz": Node("file", lzma.compress(b"\0depends=evdev,virtio\0")),
        f"{d}/kernel/b/evdev.ko.xz": Node("file", lzma.compress(b"\0depends=\0")),
        f"{d}/kernel/c/virtio-rng.ko.xz": Node("file", lzma.compress(b"\0depends=button\0")),
    }
    got = modules.select(tree, d, ("virtio_rng", "virtio"))
    assert [n for n, _ in got] == ["evdev.ko", "button.ko", "virtio-rng.ko"]
    assert got[0][1] == b"\0depends=\0"  # decompressed
    with pytest.raises(modules.ModuleError, match="no module ext4"):
        modules.select(tree, d, ("ext4",))


@pytest.mark.parametrize(("a", "b", "order"), [
    ("6.12.118-1", "6.12.117-1", 1), ("1:1.0", "2.0", 1), ("1.0~rc1", "1.0", -1),
    ("2025.89-1~deb13u1", "2025.89-1", -1), ("1.0-1", "1.0-1", 0), ("1.0a", "1.0", 1),
    ("1.0+dfsg-1", "1.0-1", 1), ("3.10.1-1", "3.9-1", 1),
])
def test_dpkg_version_order(a: str, b: str, order: int) -> None:
    assert debindex.compare(a, b) == order
    assert debindex.compare(b, a) == -order


def test_the_newest_version_over_main_and_security_wins() -> None:
    def stanza(v: str) -> str:
        return (f"Package: k\nVersion: {v}\nFilename: pool/k_{v}.deb\nSize: 1\nSHA256: {'0' * 64}\n"
                "Depends: a (>= 1) | b, c:any\n")
    index = debindex.Index(debindex.parse(stanza("6.12.117-1"), "main")
                           + debindex.parse(stanza("6.12.118-1"), "security"))
    k = index.get("k")
    assert (k.version, k.origin, k.depends) == ("6.12.118-1", "security", ("a", "b", "c"))


def test_mirrors_come_from_apt_sources_or_the_environment(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "debian.sources"
    src.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: trixie\n\n"
                   "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: trixie-security\n")
    monkeypatch.delenv("VIRBY_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("VIRBY_DEBIAN_SECURITY_MIRROR", raising=False)
    b = mirrors.bases(None, (str(src),))
    assert b == {"debian": "http://mirror.example/debian",
                 "debian-security": "http://mirror.example/debian-security"}
    assert mirrors.resolve("mirror://debian-security/pool/x.deb", b) == \
        "http://mirror.example/debian-security/pool/x.deb"
    monkeypatch.setenv("VIRBY_DEBIAN_MIRROR", "http://other.example/d/")
    assert mirrors.bases(None, (str(src),))["debian"] == "http://other.example/d"
    monkeypatch.delenv("VIRBY_DEBIAN_MIRROR")
    with pytest.raises(mirrors.MirrorError, match="VIRBY_DEBIAN_MIRROR"):
        mirrors.bases(None, ())
    monkeypatch.delenv("VIRBY_DEBIAN_SNAPSHOT", raising=False)
    assert mirrors.resolve("snapshot://debian/20261201T000000Z/pool/x.deb", b) is None


def test_the_ca_bundle_is_every_shipped_certificate_in_path_order() -> None:
    from virby.guestbuild.assemble import AssembleError, ca_bundle
    tree: Tree = {
        "usr/share/ca-certificates/mozilla/B.crt": Node("file", b"B\n"),
        "usr/share/ca-certificates/mozilla/A.crt": Node("file", b"A"),
        "usr/share/doc/ca-certificates/README.crt": Node("file", b"not a cert"),
    }
    assert ca_bundle(tree, "usr/share/ca-certificates/") == b"A\nB\n"
    with pytest.raises(AssembleError, match="no certificates"):
        ca_bundle({}, "usr/share/ca-certificates/")


def test_a_variant_file_replaces_the_common_one(tmp_path: Path) -> None:
    from virby.guestbuild.assemble import Image, overlay
    for root, text in (("common", "common\n"), ("nix", "nix\n")):
        (tmp_path / root / "etc").mkdir(parents=True)
        (tmp_path / root / "etc" / "inittab").write_text(text)
    (tmp_path / "common" / "etc" / "rc").write_text("rc\n")
    img = Image()
    overlay(img, [tmp_path / "common", tmp_path / "nix"])
    assert img.entries["etc/inittab"].data == b"nix\n"
    assert img.entries["etc/rc"].data == b"rc\n"


def test_the_nix_guest_s_own_files_are_there() -> None:
    """What the real builder needs from image/guest/nix: its init, the daemon, the collector,
    the lean nix-daemon and init starting them before sshd."""
    from virby.guestbuild.spec import GUEST_DIR
    nix = GUEST_DIR / "nix"
    for name in ("init", "usr/sbin/virby-nix-daemon", "usr/sbin/virby-nix-gc", "usr/bin/nix-daemon"):
        assert (nix / name).stat().st_mode & 0o111, name
    inittab = (nix / "etc/inittab").read_text().splitlines()
    daemon, sshd = "::respawn:/usr/sbin/virby-nix-daemon", "::respawn:/usr/sbin/virby-sshd"
    assert inittab.index(daemon) < inittab.index(sshd)
    common = (GUEST_DIR / "common/etc/inittab").read_text().splitlines()
    assert [line for line in inittab if "virby-nix" not in line] == common
    conf = (nix / "etc/nix/nix.conf").read_text().splitlines()
    assert "sandbox = true" in conf and "build-users-group = nixbld" in conf
    assert conf[-1] == "!include /etc/nix/virby.conf"


def test_follow_names_every_link_on_the_way_and_stops_at_a_loop() -> None:
    tree: Tree = {"bin": Node("link", b"usr/bin"), "usr/bin/sh": Node("link", b"busybox"),
                  "usr/bin/busybox": Node("file", b"\x7fELF"),
                  "a": Node("link", b"b"), "b": Node("link", b"a")}
    assert elfdeps.follow(tree, "bin/sh") == (
        [("bin", "usr/bin"), ("usr/bin/sh", "busybox")], "usr/bin/busybox")
    assert elfdeps.follow(tree, "usr/bin/nothere") == ([], None)
    assert elfdeps.follow(tree, "a")[1] is None
