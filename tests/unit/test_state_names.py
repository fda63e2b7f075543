"""The VM's state names are written once, in core/protocol.py: everywhere else they are its
constants, so a misspelt state is a mypy error instead of a comparison that is never true."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

from virby.core import protocol

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("core", "workers", "supervisor", "guestbuild")
NAMES = {*protocol.VM_STATES, *protocol.BOOT_PHASES, protocol.UNKNOWN}
# The same words in other vocabularies: QEMU's run and migration states, and the forwarder's
# count of clients closed unserved (its field `failed`).
FOREIGN = {
    ("workers/backends/qemu/backend.py", "running"), ("workers/backends/qemu/backend.py", "paused"),
    ("workers/backends/qemu/backend.py", "failed"), ("workers/backends/qemu/migration.py", "failed"),
    ("supervisor/statusview.py", "failed"), ("supervisor/events.py", "failed"),
}


def bare_state_names(root: Path = ROOT) -> list[str]:
    found = []
    for top in PACKAGE:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "core/protocol.py":
                continue
            tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            for tok in tokens:
                if tok.type != tokenize.STRING or tok.string[:1] not in "'\"":
                    continue
                word = tok.string[1:-1]
                if word in NAMES and (rel, word) not in FOREIGN:
                    found.append(f"{rel}:{tok.start[0]}: {tok.string}")
    return found


def test_no_state_name_is_written_out_of_the_protocol() -> None:
    assert bare_state_names() == []


def test_the_check_sees_a_bare_state_name(tmp_path: Path) -> None:
    """A state in a docstring or a comment is text; one in the code is found."""
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "w.py").write_text(
        '"""A worker that is "paused" now and then."""\n'
        'if state == "running":  # "stopped" here is a comment\n    pass\n')
    assert bare_state_names(tmp_path) == ["workers/w.py:2: \"running\""]
