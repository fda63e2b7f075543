"""`python -m bench [NAME ...] [--quick] [--out DIR]`: run Virby's benchmarks (all, or the
named ones), print one row each, and write the raw figures as JSON (default
bench/results/<timestamp>.json). Run it from the repository root.

Exit status: 0 when every selected benchmark produced its figures (whether or not it met its
target: targets are reported, not asserted), 1 when one could not run, 2 on bad arguments."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import REPO, Context, Result, machine_info
from bench.registry import NAMES, USES_RUNNING, runner
from bench.report import machine_line, notes, table
from testing.harness import build_guest


def document(results: list[Result], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "benchmarks": {r.name: r.to_json() for r in results},
            "all_ran": all(r.error is None for r in results)}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Virby's benchmarks (all, or the named ones); print a table; write raw JSON.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(NAMES)})")
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs, shorter windows (what CI runs)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="folder for the JSON (default: bench/results)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(NAMES)})")
    selected = [n for n in NAMES if n in args.names] if args.names else list(NAMES)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so every finally still ends its processes.
    signal.signal(signal.SIGTERM, _interrupt)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = args.out / f"{stamp}.json"
    log("building (or reusing) the test guest")
    guest = build_guest()
    meta: dict[str, Any] = {
        "schema": "virby-bench/1", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "selected": selected, "machine": machine_info(), "guest_dir": str(guest),
    }
    ctx = Context(quick=args.quick, guest_dir=guest, log=log)
    results: list[Result] = []
    try:
        for name in selected:
            log(f"{name}: start")
            t0, load0 = time.monotonic(), os.getloadavg()
            try:
                res = runner(name)(ctx)
            except Exception as e:
                traceback.print_exc()
                res = Result(name, "", error=f"{type(e).__name__}: {e}")
            res.seconds = time.monotonic() - t0
            # Other work on the machine skews every figure: keep the load next to them.
            res.details["loadavg_before"], res.details["loadavg_after"] = list(load0), list(os.getloadavg())
            results.append(res)
            shown = f"ERROR {res.error}" if res.error else res.measured_text
            log(f"{name}: {shown} ({res.seconds:.0f} s)")
            later = selected[selected.index(name) + 1:]
            if name in USES_RUNNING and not any(n in USES_RUNNING for n in later):
                ctx.close()
            write_json(path, document(results, meta))
    finally:
        ctx.close()
    meta["wall_seconds"] = round(time.monotonic() - t_start, 1)
    write_json(path, document(results, meta))
    benches = [r.to_json() for r in results]
    print(table(benches))
    for line in notes(benches):
        print(f"  {line}")
    print(f"\nmachine: {machine_line(meta['machine'])}")
    print(f"wall time {meta['wall_seconds']:.0f} s; raw figures in {path}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
