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
