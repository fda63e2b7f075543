"""What the Mac must offer for vfkit's `rosetta` device and `--nested`, decided from given facts
(a version string, a CPU name, a filesystem root): nothing here asks the machine it runs on."""

from __future__ import annotations

from pathlib import Path

import pytest

from virby.core import machost
from virby.core.machost import (
    ROSETTA_INSTALL,
    ROSETTA_RUNTIME,
    nested_problem,
    parse_macos_version,
    rosetta_problem,
)


@pytest.mark.parametrize(("text", "version"), [
    ("15.1.1", (15, 1)),
    ("15.0", (15, 0)),
    ("14", (14, 0)),
    ("26.0.1", (26, 0)),
    ("13.6.9", (13, 6)),
    ("", None),  # platform.mac_ver() off macOS
    ("10.16", None),  # macOS 11+ as an old-SDK program sees it: says nothing
    ("fifteen", None),
    ("15.x", None),
])
def test_parse_macos_version(text: str, version: tuple[int, int] | None) -> None:
    assert parse_macos_version(text) == version


def install_rosetta(root: Path) -> None:
    runtime = root / ROSETTA_RUNTIME
    runtime.parent.mkdir(parents=True)
    runtime.write_bytes(b"\xcf\xfa\xed\xfe")


def test_rosetta_missing_names_the_install_command(tmp_path: Path) -> None:
    problem = rosetta_problem("arm64", (15, 2), str(tmp_path))
    assert problem is not None
    assert "Rosetta is not installed on this Mac" in problem.detail
    assert '"rosetta is not installed"' in problem.detail  # what vfkit says, for the search
    assert problem.fix == f"install it: `{ROSETTA_INSTALL}` (or set `rosetta` to false)"
    assert ROSETTA_INSTALL == "softwareupdate --install-rosetta --agree-to-license"
    install_rosetta(tmp_path)
    assert rosetta_problem("arm64", (15, 2), str(tmp_path)) is None
    assert rosetta_problem("arm64", None, str(tmp_path)) is None  # version unknown: the file decides


def test_rosetta_oahd_leftovers_are_not_an_install(tmp_path: Path) -> None:
    """A directory where the library should be, or only the oah folder, is not Rosetta."""
    (tmp_path / ROSETTA_RUNTIME).mkdir(parents=True)
    assert rosetta_problem("arm64", (14, 0), str(tmp_path)) is not None


def test_rosetta_needs_apple_silicon_and_macos_13(tmp_path: Path) -> None:
    install_rosetta(tmp_path)
    intel = rosetta_problem("x86_64", (15, 0), str(tmp_path))
    assert intel is not None and "needs an Apple silicon Mac (this one is x86_64)" in intel.detail
    old = rosetta_problem("arm64", (12, 7), str(tmp_path))
    assert old is not None and old.detail == ("Rosetta for Linux VMs needs macOS 13 or later "
                                              "(this Mac runs macOS 12.7)")
    assert rosetta_problem("arm64", (13, 0), str(tmp_path)) is None


@pytest.mark.parametrize(("brand", "macos", "says"), [
    ("Apple M3 Pro", (15, 0), None),
    ("Apple M4 Max", (26, 1), None),
    (None, None, None),  # nothing known: vfkit decides
    ("Apple M3", None, None),
    (None, (15, 3), None),
    ("Apple M1", (15, 0), "Apple M1 cannot run nested VMs (an M3 or later is needed)"),
    ("Apple M2 Ultra", (26, 0), "Apple M2 Ultra cannot run nested VMs (an M3 or later is needed)"),
    ("Apple M3 Pro", (14, 7), "nested virtualization needs macOS 15 or later (this Mac runs macOS 14.7)"),
    (None, (14, 0), "nested virtualization needs macOS 15 or later (this Mac runs macOS 14.0)"),
    ("Apple M10", (15, 0), None),  # not an M1
])
def test_nested_needs_m3_and_macos_15(brand: str | None, macos: tuple[int, int] | None,
                                      says: str | None) -> None:
    problem = nested_problem(brand, macos)
    assert (problem.detail if problem else None) == says
    if problem:
        assert "set `nestedVirtualization` to false" in problem.fix


def test_off_macos_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> tuple[str, tuple[str, str, str], str]:
        raise AssertionError("platform.mac_ver must not be asked off macOS")

    monkeypatch.setattr(machost.sys, "platform", "linux")
    monkeypatch.setattr(machost.platform, "mac_ver", boom)
    assert machost.host_macos_version() is None
    assert machost.host_rosetta_problem() is None


def test_on_macos_the_version_comes_from_mac_ver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(machost.sys, "platform", "darwin")
    monkeypatch.setattr(machost.platform, "mac_ver", lambda: ("14.6.1", ("", "", ""), "arm64"))
    monkeypatch.setattr(machost, "host_machine", lambda: "arm64")
    monkeypatch.setattr(machost, "ROOT", str(tmp_path))
    assert machost.host_macos_version() == (14, 6)
    problem = machost.host_rosetta_problem()
    assert problem is not None and ROSETTA_INSTALL in str(problem)
    install_rosetta(tmp_path)
    assert machost.host_rosetta_problem() is None
