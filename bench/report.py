"""The results table, from a run's JSON: `python -m bench.report FILE` prints it as Markdown
(what docs/performance.md shows)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("benchmark", "measured", "baseline", "ratio", "target", "result")


def rows(benchmarks: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for b in benchmarks:
        if b.get("error") is not None:
            out.append((b["name"], "—", "—", "—", b.get("target", ""), "ERROR"))
            continue
        ratio = b.get("ratio")
        out.append((b["name"], b.get("measured_text", ""), b.get("baseline_text", ""),
                    f"{ratio:.3f}" if isinstance(ratio, int | float) else "—", b.get("target", ""),
                    "PASS" if b.get("pass") else "FAIL"))
    return out


def table(benchmarks: list[dict[str, Any]]) -> str:
    """A Markdown table (also readable as plain text), one row per benchmark."""
    body = rows(benchmarks)
    widths = [max(len(r[i]) for r in [COLUMNS, *body]) for i in range(len(COLUMNS))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in body)])


def notes(benchmarks: list[dict[str, Any]]) -> list[str]:
    out = []
    for b in benchmarks:
        d = b.get("details", {})
        load = ""
        if "loadavg_before" in d and "loadavg_after" in d:
            load = f"load {d['loadavg_before'][0]:.1f}→{d['loadavg_after'][0]:.1f}, "
        out.append(f"{b['name']}: {b.get('error') or b.get('why', '')} ({load}{b.get('seconds', 0):.0f} s)")
    return out


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m.get('nproc')} × {m.get('cpu_model')}, {m.get('mem_total_mib')} MiB, "
            f"kernel {m.get('kernel')}, {m.get('os')}, {m.get('qemu')}, accel {m.get('accel')}, "
            f"Python {m.get('python')}, {m.get('socat')}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report FILE", file=sys.stderr)
        return 2
    doc = json.loads(Path(args[0]).read_text())
    benches = list(doc["benchmarks"].values())
    print(table(benches))
    print()
    for n in notes(benches):
        print(f"- {n}")
    print(f"\nMachine: {machine_line(doc['machine'])}.")
    print(f"Command: `{' '.join(doc['command'])}`, wall time {doc.get('wall_seconds', '?')} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
