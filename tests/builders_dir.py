"""A builders directory (one config file per builder, README "Builders side by side") for tests
that read it without starting anything: an aarch64 builder with Rosetta and an x86_64 one."""

from __future__ import annotations

from pathlib import Path

BUILDERS = (("virby-arm", "aarch64", 40011, ', "rosetta": true'), ("virby-x86", "x86_64", 40012, ""))


def make_builders_dir(tmp_path: Path) -> Path:
    d = tmp_path / "builders"
    d.mkdir()
    for name, arch, port, extra in BUILDERS:
        (d / f"{name}.json").write_text(
            f'{{"name": "{name}", "arch": "{arch}", "port": {port}, "runtimeDir": "/tmp/vbu-{name}", '
            f'"stateDir": "{tmp_path / name}"{extra}}}')
    return d
