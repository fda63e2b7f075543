"""How Nix finds the builder: read the system's nix.conf the way Nix reads it and say which file
lists the builder's alias (`virby doctor`).

Nix takes remote machines from its `builders` setting: machine lines separated by `;` or newlines,
and `@FILE` entries naming files of such lines. Its default is `@<conf dir>/machines`, which is
where nix-darwin (`nix.buildMachines`) and Determinate's module (`determinateNix.buildMachines`)
write them. nix.conf may `include`/`!include` other files (Determinate Nix's /etc/nix/nix.conf
includes nix.custom.conf), and the last `builders =` read wins. A machine line starts with its
store URI, `ssh-ng://virby-vm` (the host is the builder's ssh alias, the config's `name`).

Only what the daemon reads counts: the system's nix.conf, not a user's (`builders` from a user
is honoured only for trusted users, and only for their own builds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_CONF_DIR = "/etc/nix"
DETERMINATE_CUSTOM_CONF = "nix.custom.conf"


@dataclass
class Registration:
    alias: str
    builders: str  # the `builders` value in effect
    set_in: str | None  # the conf file that set it; None: Nix's default
    conf_files: list[str] = field(default_factory=list)  # every conf file read, includes too
    machine_files: list[str] = field(default_factory=list)  # every @FILE named, in order
    absent: list[str] = field(default_factory=list)  # named machine files that do not exist
    unreadable: list[str] = field(default_factory=list)  # named but not readable (why)
    line: str | None = None  # the first machine line for the alias
    found_in: str | None = None  # the file holding it (a conf file for an inline line)

    @property
    def determinate(self) -> bool:
        return any(os.path.basename(f) == DETERMINATE_CUSTOM_CONF for f in self.conf_files)


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _read(path: str, reg: Registration, missing: list[str] | None = None) -> str | None:
    """A file Nix reads, or None. Nix skips a missing or unreadable one quietly; we note an
    unreadable one with the reason in reg.unreadable, and a missing one in `missing`."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        if missing is not None:
            missing.append(path)
    except OSError as e:
        reg.unreadable.append(f"{path} ({e.strerror})")
    return None


def read_conf(path: str, reg: Registration, depth: int = 0) -> None:
    """Apply one nix.conf (and what it includes) to reg.builders/set_in, as Nix does."""
    if depth > 10:
        reg.unreadable.append(f"{path} (includes nest too deep)")
        return
    text = _read(path, reg)
    if text is None:
        return
    reg.conf_files.append(path)
    for raw in text.splitlines():
        tokens = _strip_comment(raw).split()
        if len(tokens) == 2 and tokens[0] in ("include", "!include"):
            read_conf(os.path.join(os.path.dirname(path), tokens[1]), reg, depth + 1)
        elif len(tokens) >= 2 and tokens[1] == "=" and tokens[0] == "builders":
            reg.builders, reg.set_in = " ".join(tokens[2:]), path


def machine_host(uri: str) -> str:
    """`ssh-ng://nix@virby-vm?x=y` -> `virby-vm` (a bare host is the legacy ssh form)."""
    host = uri.split("://", 1)[-1]
    host = host.split("?", 1)[0].rsplit("@", 1)[-1]
    return host.rstrip("/")


def _scan(text: str, where: str, reg: Registration, depth: int) -> None:
    for entry in text.replace(";", "\n").splitlines():
        entry = _strip_comment(entry)
        if not entry:
            continue
        if entry.startswith("@"):
            path = entry[1:].strip()
            reg.machine_files.append(path)
            if depth > 10:
                reg.unreadable.append(f"{path} (nested too deep)")
                continue
            content = _read(path, reg, missing=reg.absent)
            if content is not None:
                _scan(content, path, reg, depth + 1)
        elif reg.line is None and machine_host(entry.split()[0]) == reg.alias:
            reg.line, reg.found_in = entry, where


def find(alias: str, conf_dir: str = DEFAULT_CONF_DIR) -> Registration:
    """Where (if anywhere) Nix, configured from conf_dir, finds a machine for `alias`."""
    reg = Registration(alias, "@" + os.path.join(conf_dir, "machines"), None)
    read_conf(os.path.join(conf_dir, "nix.conf"), reg)
    _scan(reg.builders, reg.set_in or "Nix's default", reg, 0)
    return reg


def line_systems(line: str) -> list[str]:
    fields = line.split()
    return fields[1].split(",") if len(fields) > 1 and fields[1] != "-" else []
