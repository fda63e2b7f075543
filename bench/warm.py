"""warm: `ssh true` through the forwarder to a running VM, against `ssh true` straight to the
guest's forwarded port (`virby status --json` .vm.endpoint). Samples alternate between the two
paths. Target: forwarder / direct <= 1.02 (medians). `warm_aarch64`: the same against the
aarch64 guest."""

from __future__ import annotations

import json

from bench.common import Context, Result, summary, timed_ssh_true

NAME = "warm"
TARGET = 1.02


def _ms(s: dict[str, float | int]) -> str:
    return f"{s['median'] * 1000:.0f} ms (p10–p90 {s['p10'] * 1000:.0f}–{s['p90'] * 1000:.0f})"


def run(ctx: Context, arch: str = "x86_64") -> Result:
    n = ctx.runs(full=30, quick=8)
    res = Result(NAME if arch == "x86_64" else f"{NAME}_{arch}", "s", target=f"forwarder ÷ direct ≤ {TARGET}")
    inst = ctx.running_instance(arch)
    status = json.loads(inst.cli("status", "--json").stdout)
    host, port = status["vm"]["endpoint"]
    if host != "127.0.0.1":
        raise RuntimeError(f"unexpected guest endpoint {host}:{port}")
    fwd: list[float] = []
    direct: list[float] = []
    timed_ssh_true(inst.ssh_config)  # one untimed of each: caches, guest page cache
    timed_ssh_true(inst.ssh_config, port=port)
    for i in range(n):
        if i % 2 == 0:
            fwd.append(timed_ssh_true(inst.ssh_config))
            direct.append(timed_ssh_true(inst.ssh_config, port=port))
        else:
            direct.append(timed_ssh_true(inst.ssh_config, port=port))
            fwd.append(timed_ssh_true(inst.ssh_config))
    sf, sd = summary(fwd), summary(direct)
    res.samples = {"forwarder": fwd, "direct": direct}
    res.measured, res.baseline = float(sf["median"]), float(sd["median"])
    res.ratio = res.measured / res.baseline
    res.passed = res.ratio <= TARGET
    res.details = {"forwarder": sf, "direct": sd, "guest_port": port}
    res.measured_text = _ms(sf)
    res.baseline_text = _ms(sd)
    res.why = (f"the forwarder adds {(res.measured - res.baseline) * 1000:+.1f} ms "
               f"to a {res.baseline * 1000:.0f} ms ssh")
    return res
