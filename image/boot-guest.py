"""Boot a built guest N times under QEMU (TCG) and print, per boot, the seconds from starting
QEMU to the agent's `virby-ready` and to a finished `ssh true` (dropbear, pinned host key).

Usage (from the repository root):
  python image/boot-guest.py DIR [--arch x86_64|aarch64] [-n 5] [--memory 512] [--disk FILE]
x86_64: q35, agent on the second serial port. aarch64: `-M virt -cpu cortex-a72`, agent on a
virtio-console port named virby.agent. --disk attaches FILE as /dev/vda (the nix variant's store).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_guest_image import USERNET_RE, Agent, Keys, Qmp, Vm, connect_unix, run, ssh
from virby.workers.cpio import append_archive


def argv_for(arch: str, guest: Path, run_dir: Path, memory: int, disk: str | None,
             extra: str = "") -> list[str]:
    common = ["-accel", "tcg", "-m", str(memory), "-nodefaults", "-no-user-config",
              "-display", "none", "-no-reboot", "-kernel", str(guest / "vmlinuz"),
              "-initrd", str(run_dir / "initrd.img"),
              "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:0-:22",
              "-device", "virtio-net-pci,netdev=n0,romfile=", "-device", "virtio-rng-pci",
              "-serial", f"file:{run_dir / 'console.log'}",
              "-chardev", f"socket,id=agent,path={run_dir / 'agent.sock'},server=on,wait=off",
              "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off"]
    if disk:
        common += ["-drive", f"file={disk},if=virtio,format=raw,cache=writeback"]
    if arch == "aarch64":
        return ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", *common,
                "-append", f"console=ttyAMA0 quiet panic=-1 {extra}".strip(), "-device", "virtio-serial-pci",
                "-device", "virtserialport,chardev=agent,name=virby.agent"]
    return ["qemu-system-x86_64", "-M", "q35", *common,
            "-append", f"console=ttyS0 quiet panic=-1 {extra}".strip(), "-serial", "chardev:agent"]


def boot_once(arch: str, guest: Path, memory: int, disk: str | None,
              extra: str = "") -> tuple[float, float]:
    keys = Keys.generate()
    run_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="vbg-"))
    try:
        append_archive(str(guest / "initrd.img"), keys.archive(), str(run_dir / "initrd.img"))
        with open(run_dir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(argv_for(arch, guest, run_dir, memory, disk, extra),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        t0 = time.monotonic()
        try:
            qmp = Qmp(connect_unix(run_dir / "qmp.sock", proc))
            agent = Agent(connect_unix(run_dir / "agent.sock", proc))
            m = USERNET_RE.search(qmp.command("human-monitor-command", **{"command-line": "info usernet"}))
            assert m, "no SSH forward"
            vm = Vm(run_dir, proc, qmp, agent, int(m.group(1)), t0)
            agent.expect("virby-ready", 300)
            ready = time.monotonic() - t0
            with ssh(vm, keys) as client:
                run(client, "true")
            return ready, time.monotonic() - t0
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("guest", type=Path)
    p.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64")
    p.add_argument("-n", type=int, default=5)
    p.add_argument("--memory", type=int, default=512)
    p.add_argument("--disk")
    p.add_argument("--append", default="", help="more kernel arguments")
    a = p.parse_args()
    ready, done = [], []
    for i in range(a.n):
        r, s = boot_once(a.arch, a.guest, a.memory, a.disk, a.append)
        ready.append(r)
        done.append(s)
        print(f"boot {i + 1}: virby-ready {r:.2f}s, ssh true done {s:.2f}s", flush=True)
    print(f"median: virby-ready {statistics.median(ready):.2f}s ({min(ready):.2f} to {max(ready):.2f}), "
          f"ssh true {statistics.median(done):.2f}s ({min(done):.2f} to {max(done):.2f}), n={a.n}")


if __name__ == "__main__":
    main()
