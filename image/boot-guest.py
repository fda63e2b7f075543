"""Boot a built guest N times under QEMU (TCG) and print, per boot, the seconds from starting
QEMU to the agent's `virby-ready` and to a finished `ssh true` (dropbear, pinned host key).
QEMU is started by the qemu backend's own start (through testing/direct.py's `booted`), with
a 1 GiB data disk.

Usage (from the repository root):
  python image/boot-guest.py DIR [--arch x86_64|aarch64] [-n 5] [--memory 512] [--append ARGS]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testing.direct import Keys, booted, run, ssh


def boot_once(arch: str, guest: Path, memory: int, extra: str) -> tuple[float, float]:
    keys = Keys.generate()
    with booted(guest, keys, memory=memory, append=extra, arch=arch) as vm:
        ready = vm.wait_ready()
        with ssh(vm, keys) as client:
            run(client, "true")
        return ready, time.monotonic() - vm.started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("guest", type=Path)
    p.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--memory", type=int, default=512)
    p.add_argument("--append", default="", help="more kernel arguments")
    a = p.parse_args()
    ready, done = [], []
    for i in range(a.n):
        r, s = boot_once(a.arch, a.guest, a.memory, a.append)
        ready.append(r)
        done.append(s)
        print(f"boot {i + 1}: virby-ready {r:.2f}s, ssh true done {s:.2f}s", flush=True)
    print(f"median: virby-ready {statistics.median(ready):.2f}s ({min(ready):.2f} to {max(ready):.2f}), "
          f"ssh true {statistics.median(done):.2f}s ({min(done):.2f} to {max(done):.2f}), n={a.n}")


if __name__ == "__main__":
    main()
