"""`virby status` as a person reads it: one table from the dict control.status() returns.
Pure functions of that dict (and the current time), so they are unit-tested without a Virby."""

from __future__ import annotations

import time
from typing import Any

from virby.core.protocol import (
    FAILED,
    PAUSED,
    RUNNING,
    UNKNOWN,
    ForwarderStateData,
    as_idle_state,
    as_vm_state,
)


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 2h10m, 3d04h."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _ago(t: Any, now: float) -> str:
    if not isinstance(t, int | float) or not t:
        return "-"
    return f"{duration(now - t)} ago"


def _seconds(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, int | float) else "-"


def _short_inc(inc: Any) -> str:
    return str(inc) if inc else "-"


def store_line(store: dict[str, Any]) -> str:
    g = store.get("guest")
    if isinstance(g, dict) and g.get("size"):
        return (f"{size(g['used'])} used of {size(g['size'])} ({100 * g['used'] // g['size']}%), "
                f"{size(g['avail'])} free (Nix collects below min-free)")
    host = f"disk {size(store.get('disk_size'))}, {size(store.get('allocated'))} written on the host"
    why = f"; the guest did not answer: {store['error']}" if store.get("error") else \
        " (the guest's use shows while the VM runs)"
    return host + why


def format_status(st: dict[str, Any], now: float | None = None) -> str:
    now = now if now is not None else float(st.get("time") or time.time())
    vm = as_vm_state(st.get("vm") or {})
    state = vm.get("state", UNKNOWN)
    lines: list[str] = []
    since = vm.get("since")
    lines.append(f"{'VM':<12}{state}" + (f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
                                         f" ({_ago(since, now)})" if isinstance(since, int | float) else ""))
    if vm.get("reason"):
        lines.append(f"{'reason':<12}{vm['reason']}")
    retry_at = vm.get("retry_at")
    if state == FAILED and retry_at is not None:
        lines.append(f"{'next try':<12}in {duration(retry_at - now)} (on the next connection)")
    last = vm.get("last_boot_seconds")
    restore = vm.get("last_restore_seconds")
    lines.append(f"{'backend':<12}{vm.get('backend', '-')}    boots {vm.get('boots', '-')}    "
                 f"last cold start {_seconds(last)}    restores {vm.get('restores', '-')}    "
                 f"last restore {_seconds(restore)}")
    raw_cfg = vm.get("config")
    cfg: dict[str, Any] = raw_cfg if isinstance(raw_cfg, dict) else {}
    if cfg.get("error"):
        lines.append(f"{'config':<12}not re-read: {cfg['error']}")
    for line in cfg.get("refused") or []:
        lines.append(f"{'config':<12}refused: {line}")
    for line in cfg.get("pending") or []:
        lines.append(f"{'config':<12}pending (at the next boot): {line}")
    snap = vm.get("snapshot")
    if isinstance(snap, dict):
        saved = snap.get("save_seconds")
        lines.append(f"{'saved VM':<12}{size(snap.get('size'))}, saved {_ago(snap.get('saved_at'), now)}"
                     + (f" (in {saved:.2f}s)" if isinstance(saved, int | float) else ""))
    elif vm.get("can_suspend") is False and state in (RUNNING, PAUSED):
        lines.append(f"{'saved VM':<12}none (this backend cannot save a VM: stop shuts it down)")
    fwd: ForwarderStateData = vm.get("forwarder") or {}
    conn = vm.get("connections")
    extra = []
    if isinstance(fwd.get("waiting"), int) and fwd["waiting"]:
        extra.append(f"{fwd['waiting']} waiting for the VM")
    if isinstance(fwd.get("accepted"), int):
        extra.append(f"{fwd['accepted']} accepted")
    if isinstance(fwd.get("failed"), int) and fwd["failed"]:
        extra.append(f"{fwd['failed']} closed unserved")
    lines.append(f"{'connections':<12}{conn if conn is not None else '-'} open"
                 + (f" ({', '.join(extra)})" if extra else ""))
    idle = as_idle_state(st.get("idle") or {})
    cd = st.get("countdown") or {}
    if idle:
        steps = []
        if cd.get("pause_in") is not None:
            steps.append(f"pause in {duration(cd['pause_in'])}")
        if cd.get("stop_in") is not None:
            steps.append(f"stop in {duration(cd['stop_in'])}")
        lines.append(f"{'idle':<12}{idle.get('decision', '-')}" + (f" ({', '.join(steps)})" if steps else ""))
    else:
        lines.append(f"{'idle':<12}(the idle monitor does not answer)")
    store = st.get("store")
    if isinstance(store, dict):
        lines.append(f"{'store':<12}{store_line(store)}")
    hv = st.get("hypervisor")
    if hv:
        lines.append(f"{'hypervisor':<12}pid {hv['pid']}    RSS {size(hv.get('rss'))}    "
                     f"CPU {hv.get('cpu_percent_avg')}% avg "
                     f"({hv.get('cpu_seconds')}s in {duration(hv.get('age'))})")
    lines.append("")
    lines.append(f"{'watcher':<11}{'status':<10}{'up':<9}{'restarts':<10}incarnation")
    for name, w in (st.get("watchers") or {}).items():
        restarts = w.get("restarts")
        up = duration(w.get("uptime")) if w.get("uptime") is not None else "-"
        count = str(restarts) if restarts is not None else "-"
        lines.append(f"{name:<11}{w.get('status', '-'):<10}{up:<9}{count:<10}"
                     f"{_short_inc(w.get('incarnation'))}")
        failure = w.get("failure")
        if isinstance(failure, dict):
            when = _ago(failure.get("time"), now)
            lines.append(f"{'':<11}crashed {failure.get('count')}x, last {when}: {failure.get('reason')}")
    return "\n".join(lines)
