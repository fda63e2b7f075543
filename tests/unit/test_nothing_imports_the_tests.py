"""The package, bench/, image/'s tools and testing/ never import the test suite: what they share
with the tests lives in testing/ (import-linter sees only the package, so this reads the rest)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "workers", "supervisor", "guestbuild", "testing", "bench", "image")


def imports_of_tests(source: str) -> list[str]:
    """The `tests` imports in one module's source, as written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [n for n in names if n == "tests" or n.startswith("tests.")]
    return found


def test_no_module_outside_tests_imports_them() -> None:
    offenders = {str(p.relative_to(REPO)): found
                 for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))
                 if (found := imports_of_tests(p.read_text()))}
    assert offenders == {}


def test_the_check_sees_both_import_forms() -> None:
    assert imports_of_tests("from tests.harness import Instance\nimport tests.require\n"
                            "import testing.direct\nfrom testing import harness\n") == [
        "tests.harness", "tests.require"]
