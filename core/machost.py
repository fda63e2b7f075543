"""What the Mac itself must offer for the vfkit backend's options, asked without starting vfkit.

vfkit refuses to start, every time, when the Mac cannot give what the command line asks for:

* the `rosetta` device, when Rosetta is not installed ("rosetta is not installed"); vfkit asks
  Virtualization.framework, which also answers "not supported" below macOS 13;
* `--nested`, below macOS 15 or on a CPU without nested virtualization (M1, M2).

The same answers serve the vfkit backend's `check()` and `virby doctor`, so this module lives
outside the backends (the CLI may not import them). The decisions are pure functions of what
they are given (a version, a CPU name, a filesystem root); only the `host_*` functions read
this machine, and only on macOS.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass

# Rosetta's runtime library: present exactly when Rosetta is installed (it is what
# `softwareupdate --install-rosetta` adds; the oahd plists outlive an uninstall).
ROSETTA_RUNTIME = "Library/Apple/usr/libexec/oah/libRosettaRuntime"
ROSETTA_INSTALL = "softwareupdate --install-rosetta --agree-to-license"
ROSETTA_MIN_MACOS = (13, 0)  # Virtualization.framework's Linux Rosetta share
NESTED_MIN_MACOS = (15, 0)  # Virtualization.framework's nested virtualization

ROOT = "/"  # the filesystem the host_* functions read (tests point it at a temp dir)

MacVersion = tuple[int, int]


@dataclass(frozen=True)
class Problem:
    """Why the Mac cannot give what the config asks for, and what to do about it."""

    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.detail}; {self.fix}"


def parse_macos_version(text: str) -> MacVersion | None:
    """'15.1.1' -> (15, 1); '14' -> (14, 0). None for '' (not a Mac) or garbage. macOS 11+
    answers '10.16' to programs built against an old SDK: that says nothing, so None too."""
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", text)
    if m is None:
        return None
    version = (int(m.group(1)), int(m.group(2) or 0))
    return None if version == (10, 16) else version


def show_version(version: MacVersion | None) -> str:
    return "an unknown macOS version" if version is None else f"macOS {version[0]}.{version[1]}"


def rosetta_installed(root: str = "/") -> bool:
    return os.path.isfile(os.path.join(root, ROSETTA_RUNTIME))


def rosetta_problem(machine: str, macos: MacVersion | None, root: str = "/") -> Problem | None:
    """Why vfkit's `rosetta` device cannot work on this Mac (`machine` is `uname -m`), or None."""
    if machine != "arm64":
        return Problem(f"Rosetta for Linux needs an Apple silicon Mac (this one is {machine})",
                       "set `rosetta` to false")
    if macos is not None and macos < ROSETTA_MIN_MACOS:
        return Problem(f"Rosetta for Linux VMs needs macOS {ROSETTA_MIN_MACOS[0]} or later "
                       f"(this Mac runs {show_version(macos)})",
                       "update macOS, or set `rosetta` to false")
    if not rosetta_installed(root):
        return Problem("Rosetta is not installed on this Mac (no "
                       f"{os.path.join(root, ROSETTA_RUNTIME)}): vfkit refuses to start "
                       "(\"rosetta is not installed\")",
                       f"install it: `{ROSETTA_INSTALL}` (or set `rosetta` to false)")
    return None


def nested_problem(brand: str | None, macos: MacVersion | None) -> Problem | None:
    """Why vfkit's `--nested` cannot work, or None. Unknown facts (None) are left to vfkit."""
    if brand is not None and re.search(r"\bM[12]\b", brand) is not None:
        return Problem(f"{brand} cannot run nested VMs (an M3 or later is needed)",
                       "set `nestedVirtualization` to false")
    if macos is not None and macos < NESTED_MIN_MACOS:
        return Problem(f"nested virtualization needs macOS {NESTED_MIN_MACOS[0]} or later "
                       f"(this Mac runs {show_version(macos)})",
                       "update macOS, or set `nestedVirtualization` to false")
    return None


# -- this machine --------------------------------------------------------------------------------


def host_macos_version() -> MacVersion | None:
    """This Mac's version; None off macOS (platform.mac_ver reads a plist, starts nothing)."""
    if sys.platform != "darwin":
        return None
    return parse_macos_version(platform.mac_ver()[0])


def host_machine() -> str:
    return os.uname().machine


@functools.cache
def cpu_brand() -> str | None:
    """The host CPU's name ("Apple M2 Pro"), only asked of macOS."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def host_rosetta_problem() -> Problem | None:
    """None off macOS: vfkit runs only there, and nothing here can be asked."""
    if sys.platform != "darwin":
        return None
    return rosetta_problem(host_machine(), host_macos_version(), ROOT)
