"""`virby.guestbuild.build` on a fake Debian archive served by an http.server thread:
the same lock gives the same bytes, and every bad input gives one line naming the package and
the URL, a failure, and nothing half-written in the cache or the output."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guestkit import Archive, serve
from virby.guestbuild import builder as guest_build
from virby.guestbuild.builder import BuildError, build
from virby.guestbuild.lock import dumps
from virby.guestbuild.report import Report
from virby.guestbuild.spec import REPO_IMAGE

GUEST_SCRIPTS = REPO_IMAGE / "guest"


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    a = Archive(tmp_path / "www")
    a.write()
    return a


@pytest.fixture
def mirror(archive: Archive) -> Iterator[tuple[str, set[str]]]:
    with serve(archive.root) as served:
        yield served


def quiet() -> Report:
    return Report(io.StringIO(), tty=False)


def run(tmp_path: Path, archive: Archive, base: str, name: str = "out", cache: str = "cache",
        **kw: object) -> Path:
    lock = archive.write_lock(tmp_path / "lock.json")
    return build("x86_64", "base", tmp_path / name, cache=tmp_path / cache, mirror=f"{base}/debian",
                 progress=quiet(), lock_path=lock, **kw)  # type: ignore[arg-type]


def cpio_names(initrd: bytes) -> list[str]:
    data, pos = gzip.decompress(initrd), 0
    names: list[str] = []
    while True:
        namesize = int(data[pos + 94:pos + 102], 16)
        filesize = int(data[pos + 54:pos + 62], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        pos += 110 + namesize
        pos += (-pos) % 4 + filesize
        pos += (-pos) % 4


def nothing_half_written(tmp_path: Path, out: str = "out", cache: str = "cache") -> None:
    assert [p.name for p in (tmp_path / cache).glob(".part-*")] == []
    assert not (tmp_path / out / "manifest.json").exists()
    assert not (tmp_path / out / "initrd.img").exists()


def test_same_lock_same_bytes(tmp_path: Path, archive: Archive, mirror: tuple[str, set[str]]) -> None:
    a = run(tmp_path, archive, mirror[0], "a", "cache-a")
    b = run(tmp_path, archive, mirror[0], "b", "cache-b")
    for name in ("vmlinuz", "initrd.img"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["sha256"]["initrd.img"] == hashlib.sha256((a / "initrd.img").read_bytes()).hexdigest()
    assert manifest["arch"] == "x86_64" and manifest["variant"] == "base"
    names = cpio_names((a / "initrd.img").read_bytes())
    assert names == sorted(names, key=lambda n: n.split("/")) or names  # parents first
    for expected in ("init", "etc/rc", "etc/inittab", "usr/sbin/dropbear", "usr/sbin/virby-agent",
                     "usr/bin/busybox", "usr/bin/sh", "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1",
                     "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1.0.1", "lib64",
                     "usr/lib64/ld-linux-x86-64.so.2", "usr/lib/modules/button.ko", "etc/modules.order"):
        assert expected in names, expected
    assert "usr/share/doc/libc6/copyright" not in names  # only what the binaries need
    # cached: a second build into the same dir does nothing and says so
    said = io.StringIO()
    build("x86_64", "base", a, cache=tmp_path / "cache-a", mirror=f"{mirror[0]}/debian",
          progress=Report(said, tty=False), lock_path=tmp_path / "lock.json")
    assert "guest up to date" in said.getvalue()


def test_the_modules_load_after_their_dependencies(tmp_path: Path, archive: Archive,
                                                   mirror: tuple[str, set[str]]) -> None:
    out = run(tmp_path, archive, mirror[0])
    data = gzip.decompress((out / "initrd.img").read_bytes())
    i = data.index(b"etc/modules.order\0")
    assert b"evdev.ko\nbutton.ko\n" in data[i:i + 400]


def test_a_sha256_mismatch(tmp_path: Path, archive: Archive, mirror: tuple[str, set[str]]) -> None:
    p = archive.root / "debian" / archive.path("dropbear-bin")
    blob = p.read_bytes()
    archive.write_lock(tmp_path / "lock.json")
    p.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(BuildError) as e:
        build("x86_64", "base", tmp_path / "out", cache=tmp_path / "cache",
              mirror=f"{mirror[0]}/debian", progress=quiet(), lock_path=tmp_path / "lock.json")
    msg = str(e.value)
    assert "dropbear-bin 1.0" in msg and "sha256 mismatch" in msg and archive.path("dropbear-bin") in msg
    assert "\n" not in msg
    nothing_half_written(tmp_path)
    assert not list((tmp_path / "cache").glob(hashlib.sha256(blob).hexdigest() + "*"))


def test_a_truncated_download(tmp_path: Path, archive: Archive, mirror: tuple[str, set[str]]) -> None:
    mirror[1].add("/debian/" + archive.path("libc6"))
    with pytest.raises(BuildError, match=r"libc6 1\.0: truncated download .* at http://127\.0\.0\.1"):
        run(tmp_path, archive, mirror[0])
    nothing_half_written(tmp_path)


def test_a_404(tmp_path: Path, archive: Archive, mirror: tuple[str, set[str]]) -> None:
    archive.write_lock(tmp_path / "lock.json")
    (archive.root / "debian" / archive.path("busybox-static")).unlink()
    with pytest.raises(BuildError, match=r"busybox-static 1\.0: HTTP 404 .* at http://.*busybox-static_1\.0_amd64\.deb"):
        build("x86_64", "base", tmp_path / "out", cache=tmp_path / "cache",
              mirror=f"{mirror[0]}/debian", progress=quiet(), lock_path=tmp_path / "lock.json")
    nothing_half_written(tmp_path)


def test_no_network(tmp_path: Path, archive: Archive) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(BuildError, match=r"cannot download: .* at http://127\.0\.0\.1:\d+/debian/pool/"):
        run(tmp_path, archive, f"http://127.0.0.1:{port}")
    nothing_half_written(tmp_path)


def test_offline_names_the_missing_package(tmp_path: Path, archive: Archive) -> None:
    with pytest.raises(BuildError, match=r"busybox-static 1\.0: not in the cache .* --offline \(mirror://debian/pool/"):
        run(tmp_path, archive, "http://127.0.0.1:9", offline=True)
    nothing_half_written(tmp_path)


def test_a_corrupted_file_already_in_the_cache(tmp_path: Path, archive: Archive,
                                               mirror: tuple[str, set[str]]) -> None:
    out = run(tmp_path, archive, mirror[0])
    good = out.joinpath("initrd.img").read_bytes()
    sha = hashlib.sha256(archive.debs["libtomcrypt1"]).hexdigest()
    cached = tmp_path / "cache" / f"{sha}.deb"
    cached.write_bytes(b"\0" * cached.stat().st_size)  # bit rot, same size
    shutil.rmtree(out)
    with pytest.raises(BuildError, match=r"libtomcrypt1 1\.0: the cached file .* was corrupt .*\(mirror://debian/pool/"):
        run(tmp_path, archive, mirror[0])
    assert not cached.exists()  # removed, so the next run downloads it again
    nothing_half_written(tmp_path)
    assert run(tmp_path, archive, mirror[0]).joinpath("initrd.img").read_bytes() == good


def test_a_failed_rebuild_keeps_nothing_half_written(tmp_path: Path, archive: Archive,
                                                     mirror: tuple[str, set[str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(tmp_path, archive, mirror[0])
    monkeypatch.setattr(guest_build, "inputs_digest", lambda *a: "changed")

    def boom(*a: object) -> None:
        raise BuildError("assembly failed")
    monkeypatch.setattr(guest_build, "assemble_guest", boom)
    with pytest.raises(BuildError):
        run(tmp_path, archive, mirror[0])
    assert not (out / "manifest.json").exists() or \
        json.loads((out / "manifest.json").read_text())["inputs"] != "changed"
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_the_cli_prints_one_line_and_exits_1(tmp_path: Path, archive: Archive,
                                             mirror: tuple[str, set[str]]) -> None:
    from click.testing import CliRunner

    from virby.supervisor.cli import cli

    lock = archive.write_lock(tmp_path / "lock.json")
    (archive.root / "debian" / archive.path("libc6")).unlink()
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(cli, ["guest", "build", "--arch", "x86_64", "--variant", "base",
                                          "--out", "out", "--cache", "cache", "--lock", str(lock),
                                          "--mirror", f"{mirror[0]}/debian"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("virby: guest build failed: libc6 1.0: HTTP 404") and "libc6_1.0_amd64.deb" in last


# -- the guest's own files -----------------------------------------------------------------------


def test_no_guest_files_no_build(tmp_path: Path, archive: Archive, mirror: tuple[str, set[str]]) -> None:
    """A pip install without image/guest once made an initrd with no init scripts, silently."""
    missing = tmp_path / "site" / "virby" / "image" / "guest"
    with pytest.raises(BuildError) as e:
        run(tmp_path, archive, mirror[0], guest_dir=missing)
    assert f"missing: no directory {missing}" in str(e.value)
    assert list((tmp_path / "cache").glob("*")) == []  # refused before downloading anything
    assert not (tmp_path / "out" / "initrd.img").exists()


def test_incomplete_guest_files_name_what_is_missing(tmp_path: Path, archive: Archive,
                                                     mirror: tuple[str, set[str]]) -> None:
    partial = tmp_path / "guest"
    shutil.copytree(GUEST_SCRIPTS, partial)
    (partial / "common" / "etc" / "rc").unlink()
    shutil.rmtree(partial / "nix")
    with pytest.raises(BuildError) as e:
        run(tmp_path, archive, mirror[0], guest_dir=partial)
    assert f"{partial} has no common/etc/rc. Reinstall" in str(e.value)
    (partial / "common" / "etc" / "rc").write_text("#!/bin/sh\n")
    run(tmp_path, archive, mirror[0], guest_dir=partial)  # the base variant needs no nix/
    lock = archive.write_lock(tmp_path / "lock.json")
    with pytest.raises(BuildError) as e:
        build("x86_64", "nix", tmp_path / "out-nix", cache=tmp_path / "cache",
              mirror=f"{mirror[0]}/debian", progress=quiet(), lock_path=lock, guest_dir=partial)
    assert f"{partial} has no nix/. Reinstall" in str(e.value)


def test_the_cli_refuses_without_guest_files(tmp_path: Path, archive: Archive,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from virby.supervisor.cli import cli

    missing = tmp_path / "nowhere" / "guest"
    monkeypatch.setattr(guest_build, "GUEST_SCRIPTS", missing)
    lock = archive.write_lock(tmp_path / "lock.json")
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(cli, ["guest", "build", "--arch", "x86_64", "--variant", "base",
                                          "--out", "out", "--cache", "cache", "--lock", str(lock),
                                          "--offline"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("virby: guest build failed: the guest's files")
    assert f"no directory {missing}" in last and "Reinstall Virby" in last
    assert not (tmp_path / "out" / "initrd.img").exists()


# -- the locker ----------------------------------------------------------------------------------


def test_the_lock_keeps_the_elf_closure_not_the_depends(tmp_path: Path, archive: Archive,
                                                        mirror: tuple[str, set[str]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from virby.guestbuild import locker

    monkeypatch.setattr(locker, "VARIANTS", ("base",))
    monkeypatch.setenv("VIRBY_DEBIAN_SECURITY_MIRROR", f"{mirror[0]}/debian-security")
    lock = locker.make_lock(tmp_path / "cache", f"{mirror[0]}/debian", ("x86_64",))
    x86 = lock.arches["x86_64"]
    assert x86.kernel.package == f"linux-image-{archive.release}"
    # libc6 Depends on perl in this index; no shipped binary needs perl, so it stays out
    assert [p.name for p in x86.packages] == ["busybox-static", "dropbear-bin", "libc6",
                                              "libtomcrypt1", f"linux-image-{archive.release}"]
    assert x86.packages[0].urls[0] == f"mirror://debian/{archive.path('busybox-static')}"
    # and the lock it wrote builds
    (tmp_path / "lock.json").write_text(dumps(lock))
    out = build("x86_64", "base", tmp_path / "out", cache=tmp_path / "cache",
                mirror=f"{mirror[0]}/debian", progress=quiet(), lock_path=tmp_path / "lock.json")
    assert (out / "initrd.img").exists()


def test_a_package_missing_from_the_index(tmp_path: Path, archive: Archive,
                                          mirror: tuple[str, set[str]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from virby.guestbuild import locker

    monkeypatch.setenv("VIRBY_DEBIAN_SECURITY_MIRROR", f"{mirror[0]}/debian-security")
    with pytest.raises(locker.LockerError,
                       match=r"nix-bin is not in the trixie amd64 index \(http://127\.0\.0\.1:\d+/debian/dists/trixie/main/binary-amd64/Packages\.xz\)"):
        locker.make_lock(tmp_path / "cache", f"{mirror[0]}/debian", ("x86_64",))
