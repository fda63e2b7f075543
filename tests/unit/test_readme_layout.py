"""The README's Development layout names every module of the packages and of testing/, and no
module that is gone. A new module fails here with the line to add, so the layout stays whole."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "workers", "supervisor", "guestbuild", "testing")
FOLDER_LINE = re.compile(r"^([a-z]+)/\s")  # "core/   virby.core, ..."
MODULE_LINE = re.compile(r"^\s+(\S+\.py)\s")  # "  backends/qemu/accel.py   what it is"


def layout_block(readme: str) -> list[str]:
    """The lines of the first code block after the "## Development" heading."""
    section = readme.split("\n## Development\n", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def named_modules(lines: list[str]) -> list[str]:
    """Module paths the layout names, each under the folder line above it."""
    folder, named = "", []
    for line in lines:
        top = FOLDER_LINE.match(line)
        if top:
            folder = top.group(1)
            continue
        module = MODULE_LINE.match(line)
        if module and folder in FOLDERS:
            named.append(f"{folder}/{module.group(1)}")
    return named


def modules_on_disk(root: Path) -> set[str]:
    """Every module of the folders; a package's __init__.py is named by its folder line."""
    return {p.relative_to(root).as_posix() for folder in FOLDERS
            for p in (root / folder).rglob("*.py") if p.name != "__init__.py"}


def layout_problems(readme: str, root: Path) -> list[str]:
    named = named_modules(layout_block(readme))
    on_disk = modules_on_disk(root)
    problems = [f"README.md's Development layout does not name {m}: add a line "
                f"'  {m.split('/', 1)[1]}  <what it is>' under '{m.split('/', 1)[0]}/'"
                for m in sorted(on_disk - set(named))]
    problems += [f"README.md's Development layout names {m}, which does not exist"
                 for m in sorted(set(named) - on_disk)]
    problems += [f"README.md's Development layout names {m} twice"
                 for m in sorted({m for m in named if named.count(m) > 1})]
    return problems


def test_the_readme_layout_names_every_module_and_only_those() -> None:
    problems = layout_problems((REPO / "README.md").read_text(), REPO)
    assert not problems, "\n".join(problems)


def test_a_module_the_layout_lacks_is_named_in_the_failure(tmp_path: Path) -> None:
    # The check itself, on a copy of the tree with one module added and one line removed.
    for folder in FOLDERS:
        for p in (REPO / folder).rglob("*.py"):
            dest = tmp_path / p.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.touch()
    (tmp_path / "core" / "brandnew.py").touch()
    readme = (REPO / "README.md").read_text().replace("  logtail.py ", "  logtale.py ", 1)
    assert layout_problems(readme, tmp_path) == [
        "README.md's Development layout does not name core/brandnew.py: add a line "
        "'  brandnew.py  <what it is>' under 'core/'",
        "README.md's Development layout does not name core/logtail.py: add a line "
        "'  logtail.py  <what it is>' under 'core/'",
        "README.md's Development layout names core/logtale.py, which does not exist",
    ]


def test_the_layout_covers_backends_and_testing() -> None:
    named = named_modules(layout_block((REPO / "README.md").read_text()))
    assert "workers/backends/qemu/machine.py" in named and "testing/harness.py" in named
