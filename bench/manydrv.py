"""manydrv: what each derivation costs. The host's `nix-build --max-jobs 0` of N fresh trivial
derivations (one list, a new nonce each time: never built before), on the Nix guest, three
ways in one run:

* **Virby**: through the forwarder with the ssh_config `virby ssh-config` prints (its shared
  connection: ControlMaster/ControlPersist) and the guest's `nix-daemon --stdio`, which joins
  the running daemon through nc;
* **plain SSH** (the baseline, the peers' setup): ssh straight to the guest's sshd port, no
  forwarder, no connection reuse, and Nix's own `nix-daemon --stdio` as the remote program
  (`?remote-program=/usr/libexec/nix/nix-daemon`): a handshake and a Nix process per derivation;
* **in the guest** (the floor): the same N derivations built by the guest's own Nix
  (`nix-build -j 8`) in one SSH session, timed around that session.

All three with maxJobs 8 on a 1-vCPU guest, as in issue 18's measurements: with maxJobs at the
guest's cores (1, what `virby nix-machines` advertises for it) the host's Nix postpones every
other derivation and looks again only every 5 s (its poll interval), which would hide what a
session costs. Target: Virby ≤ 0.5 × plain SSH; the ratio to the floor is reported beside it.
N = 300 (--quick, what CI runs: 30, still four rounds of maxJobs 8 each way). Each path builds
its own fresh set, once, Virby first (so the plain path cannot be helped by a warmer guest).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Context, Result
from testing.harness import Instance, build_guest
from testing.nixhost import NIX_CONFIG

NAME = "manydrv"
TARGET = 0.5
JOBS = 8
TIMEOUT = 1800

MANY_NIX = """\
{ nonce, n }:
builtins.genList (i: derivation {
  name = "many-${toString i}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo ${nonce}-${toString i} > $out" ];
}) n
"""


def host_build(inst: Instance, expr: Path, n: int, sshopts: str, machines: str) -> tuple[float, list[str]]:
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "NIX_SSHOPTS": sshopts}
    for var in ("NIX_REMOTE", "NIX_BUILDERS"):
        env.pop(var, None)
    argv = ["nix-build", str(expr), "--no-out-link", "--argstr", "nonce", uuid.uuid4().hex,
            "--arg", "n", str(n), "--max-jobs", "0", "--builders", machines]
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nix-build exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    paths = proc.stdout.split()
    if len(paths) != n or proc.stderr.count("on 'ssh-ng://") != n:
        raise RuntimeError(f"expected {n} remote builds, got {len(paths)} outputs:\n{proc.stderr[-600:]}")
    return seconds, paths


def run(ctx: Context) -> Result:
    if shutil.which("nix-build") is None:
        raise RuntimeError("nix-build is not on PATH: apt-get install -y --no-install-recommends nix-bin")
    n = ctx.runs(full=300, quick=30)
    res = Result(NAME, "s", target=f"Virby ≤ {TARGET} × plain SSH ({n} derivations)")
    ctx.log(f"{NAME}: building (or reusing) the Nix guest")
    inst = Instance(guest_dir=build_guest(with_nix=True), memory=512, cores=1,
                    onDemand={"pauseAfter": None, "stopAfter": None})
    expr = inst.dir / "many.nix"
    expr.write_text(MANY_NIX)
    built: list[str] = []
    try:
        inst.start()
        machines = f"ssh-ng://virby-vm x86_64-linux - {JOBS} 1"
        stock = f"ssh-ng://virby-vm?remote-program=/usr/libexec/nix/nix-daemon x86_64-linux - {JOBS} 1"
        config = str(inst.ssh_config)
        # first boot and the host's first evaluation, untimed; then no shared connection left
        built += host_build(inst, expr, 2, f"-F {config}", machines)[1]
        subprocess.run(["ssh", "-F", config, "-O", "exit", "virby-vm"], capture_output=True, check=False)
        port = inst.status()["vm"]["endpoint"][1]

        ctx.log(f"{NAME}: {n} derivations through Virby")
        virby_s, paths = host_build(inst, expr, n, f"-F {config}", machines)
        built += paths
        ctx.log(f"{NAME}: {n} derivations over plain SSH (port {port}, no reuse)")
        plain_s, paths = host_build(inst, expr, n, f"-F {config} -o ControlPath=none -o Port={port}",
                                    stock)
        built += paths

        ctx.log(f"{NAME}: {n} derivations inside the guest")
        copy = subprocess.run(["scp", "-F", config, str(expr), "virby-vm:/tmp/many.nix"],
                              capture_output=True, text=True, timeout=120, check=False)
        if copy.returncode != 0:
            raise RuntimeError(f"scp: {copy.stderr.strip()}")
        t0 = time.monotonic()
        inside = inst.ssh(f"nix-build -j {JOBS} --no-out-link /tmp/many.nix --argstr nonce "
                          f"{uuid.uuid4().hex} --arg n {n} | wc -l", timeout=TIMEOUT)
        floor_s = time.monotonic() - t0
        if inside.returncode != 0 or inside.stdout.strip() != str(n):
            raise RuntimeError(f"in-guest nix-build: {inside.stdout.strip()} {inside.stderr.strip()[-400:]}")
        subprocess.run(["ssh", "-F", config, "-O", "exit", "virby-vm"], capture_output=True, check=False)
    finally:
        inst.close()
        for path in built:
            subprocess.run(["nix-store", "--delete", path], capture_output=True, check=False,
                           env={**os.environ, "NIX_CONFIG": NIX_CONFIG})
    per = {k: v / n for k, v in (("virby", virby_s), ("plain", plain_s), ("floor", floor_s))}
    res.samples = {"virby_seconds": [virby_s], "plain_ssh_seconds": [plain_s], "in_guest_seconds": [floor_s]}
    res.measured, res.baseline, res.ratio = virby_s, plain_s, virby_s / plain_s
    res.passed = res.ratio <= TARGET
    details: dict[str, Any] = {"n": n, "guest_cores": 1, "max_jobs": JOBS,
                               "per_derivation_ms": {k: round(v * 1000, 1) for k, v in per.items()},
                               "virby_over_floor": virby_s / floor_s, "plain_over_floor": plain_s / floor_s}
    res.details = details
    res.measured_text = f"Virby {virby_s:.1f} s ({per['virby'] * 1000:.0f} ms/drv)"
    res.baseline_text = f"plain SSH {plain_s:.1f} s ({per['plain'] * 1000:.0f} ms/drv)"
    res.why = (f"Virby = {res.ratio:.2f} × plain SSH (target ≤ {TARGET}); in the guest {floor_s:.1f} s "
               f"({per['floor'] * 1000:.0f} ms/drv): Virby = {virby_s / floor_s:.1f} × the floor, "
               f"plain SSH = {plain_s / floor_s:.1f} ×")
    return res
