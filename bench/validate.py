"""`python -m bench.validate FILE`: exit 0 iff FILE is a benchmark run (bench/__main__.py's
JSON) with every benchmark present and every one of them with numbers (measured, baseline,
ratio: finite), a PASS/FAIL verdict and no error. Problems are listed on stderr."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.registry import NAMES


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return ["the document is not a JSON object"]
    out: list[str] = []
    if doc.get("schema") != "virby-bench/1":
        out.append(f"schema is {doc.get('schema')!r}, not 'virby-bench/1'")
    machine = doc.get("machine")
    needed = ("nproc", "cpu_model", "kernel", "qemu")
    if not isinstance(machine, dict) or not all(machine.get(k) for k in needed):
        out.append("machine info (nproc, cpu_model, kernel, qemu) is missing")
    benches = doc.get("benchmarks")
    if not isinstance(benches, dict):
        return [*out, "no 'benchmarks' object"]
    for name in NAMES:
        b = benches.get(name)
        if not isinstance(b, dict):
            out.append(f"{name}: missing")
            continue
        if b.get("error") is not None:
            out.append(f"{name}: error: {b['error']}")
        for key in ("measured", "baseline", "ratio"):
            if not _number(b.get(key)):
                out.append(f"{name}: {key} is {b.get(key)!r}, not a finite number")
        if not isinstance(b.get("pass"), bool):
            out.append(f"{name}: no PASS/FAIL verdict")
        if not isinstance(b.get("samples"), dict) or not b["samples"]:
            out.append(f"{name}: no raw samples")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.validate FILE", file=sys.stderr)
        return 2
    try:
        doc = json.loads(Path(args[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 1
    found = problems(doc)
    for p in found:
        print(f"{args[0]}: {p}", file=sys.stderr)
    if not found:
        print(f"{args[0]}: ok ({len(NAMES)} benchmarks)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
