"""What a test needs from the machine. Locally a missing tool or capability skips the test with
the reason; under CI (CI=true) it fails it: CI installs everything (install.sh), so a skip
there would only hide a test that never ran."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str, *, module: bool = False) -> NoReturn:
    """Skip (locally) or fail (under CI) the current test, or the whole module at import time."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: install.sh must provide it)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def require(tool: str, hint: str, *, module: bool = False) -> str:
    """The path of `tool` on PATH; `hint` says how to get it."""
    found = shutil.which(tool)
    if found is None:
        unavailable(f"{tool} not installed ({hint})", module=module)
    return found


def given_inputs(*names: str, hint: str) -> tuple[list[str], list[pytest.MarkDecorator]]:
    """The values of environment variables naming inputs CI cannot fetch (upstream checkouts),
    and the marks for a test that needs them: none when all are set, else a skip that says
    `hint`, under CI too. Reported in pytest's summary (-ra) either way, never left out."""
    values = [os.environ.get(name, "") for name in names]
    if all(values):
        return values, []
    missing = ", ".join(n for n, v in zip(names, values, strict=True) if not v)
    return values, [pytest.mark.skip(reason=f"{missing} not set: {hint}")]
