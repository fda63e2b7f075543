"""Garbage on the bus and on the port. The workers must not crash (same pids, still answering),
not leak (fds and RSS flat via psutil), and log a malformed message once, not once per message."""

from __future__ import annotations

import json
import os
import socket
import time

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testing.harness import Instance
from tests.reliability.support import assert_flat, log_lines, probe_banner, report, usage
from virby.supervisor.control import request
from virby.workers import bus

pytestmark = pytest.mark.reliability

DROPPED = "dropped a malformed message"

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_body = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"v": st.one_of(st.integers(), st.text(max_size=3), st.none()),
                           "kind": st.sampled_from(["state", "event", "x"]),
                           "from": st.sampled_from(["vm", "idle", "forwarder", "evil"]),
                           "inc": st.text(max_size=70), "seq": st.integers(), "t": st.floats(),
                           "data": _json}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"v": st.just(1), "id": st.text(max_size=70),
                           "cmd": st.sampled_from(["status", "bogus", "", "wake"]),
                           "args": _json}).map(lambda d: json.dumps(d).encode()),
)
_frames = st.lists(st.one_of(st.sampled_from([b"vm", b"idle", b"forwarder", b""]), _body),
                   min_size=1, max_size=3)


class BusAttacker:
    """A PUB into both inboxes and a DEALER into vm.ctl, as any local process could open."""

    def __init__(self, inst: Instance) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        for s in (self.pub, self.dealer):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100000)
        for owner in bus.INBOX_OWNERS:
            self.pub.connect(inst.config.endpoint(f"{owner}.in"))
        self.dealer.connect(inst.config.endpoint("vm.ctl"))

    def send(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)
        self.dealer.send_multipart([b"", *frames])

    def close(self) -> None:
        self.pub.close(0)
        self.dealer.close(0)
        self.ctx.term()


def _workers(inst: Instance) -> dict[str, psutil.Process]:
    return {n: psutil.Process(inst.watcher_pid(n)) for n in ("vm", "forwarder", "idle")}


def _alive_and_answering(inst: Instance) -> None:
    reply = request(inst.config, "status", timeout=5)
    assert reply["ok"] and reply["state"]["state"] in ("stopped", "failed")
    inst.wait_bus(lambda s: "vm" in s and "idle" in s, 30, "both state owners broadcasting")


def test_fuzz_the_bus(instance: Instance) -> None:
    inst = instance
    atk = BusAttacker(inst)
    try:
        # connect, warm up (first allocations), then take the baseline
        atk.send([b"vm", b"warm-up"])
        _alive_and_answering(inst)
        procs = _workers(inst)
        before = usage(procs)
        examples = 0

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(frames=_frames)
        def fuzz(frames: list[bytes]) -> None:
            nonlocal examples
            examples += 1
            atk.send(frames)

        fuzz()
        # huge messages: over the 64 KiB limit (libzmq drops the connection) and far over it
        for size in (bus.MAX_MESSAGE + 1, 1 << 20, 16 << 20):
            atk.send([b"vm", b"x" * size])
        _alive_and_answering(inst)
        # the same malformed message many times: logged once
        lines_before = {n: log_lines(inst, n, DROPPED) for n in ("vm", "idle")}
        for _ in range(2000):
            atk.send([b"forwarder", b'{"v": 99}'])
        _alive_and_answering(inst)
        lines_after = {n: log_lines(inst, n, DROPPED) for n in ("vm", "idle")}
        after = usage(procs)
    finally:
        atk.close()
    report("fuzz-bus", {"examples": examples, "dropped_lines": lines_after,
                        "rss_mib": {n: round(u.rss / 2**20, 1) for n, u in after.items()},
                        "fds": {n: (before[n].fds, after[n].fds) for n in after}})
    assert_flat(before, after, rss_mib=16)
    for n in ("vm", "idle"):
        assert lines_after[n] - lines_before[n] <= 1, (n, lines_before, lines_after)
        assert lines_after[n] <= 260  # once per (source, reason), at most 256 reasons


def test_fuzz_the_port_with_a_running_vm(booted: Instance) -> None:
    inst = booted
    procs = _workers(inst)
    probe_banner(inst.port)
    before = usage(procs)
    kinds: dict[str, int] = {"garbage": 0, "half-open": 0, "vanish": 0}
    half_closed: dict[str, int] = {"eof": 0, "reset": 0}  # how the guest's close came back

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(payload=st.binary(max_size=4096), mode=st.sampled_from(sorted(kinds)))
    def fuzz(payload: bytes, mode: str) -> None:
        kinds[mode] += 1
        s = socket.create_connection(("127.0.0.1", inst.port), timeout=30)
        try:
            if mode == "vanish":  # gone before the forwarder even dialled
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                return
            s.sendall(payload)
            if mode == "half-open":
                # our EOF goes through to the guest, whose close must come back to us: as an
                # EOF, or a reset when the guest closed with our bytes unread
                s.shutdown(socket.SHUT_WR)
                s.settimeout(60)
                try:
                    while s.recv(65536):
                        pass
                    half_closed["eof"] += 1
                except ConnectionResetError:
                    half_closed["reset"] += 1
                except TimeoutError:
                    raise AssertionError(f"half-closed after {len(payload)} bytes: "
                                         "no close came back within 60 s") from None
                return
            # garbage, then the client goes away without waiting for an answer
            s.settimeout(0.3)
            s.recv(65536)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass  # (garbage: no answer waited for, or the guest's sshd closed on what we sent)
        finally:
            s.close()

    fuzz()
    assert sum(half_closed.values()) == kinds["half-open"], (half_closed, kinds)
    # Clients that vanish while the VM boots: stop it, then connect and leave at once.
    inst.cli("stop", "--cold", timeout=60)
    inst.wait_vm("stopped")
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", inst.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
    t0 = time.monotonic()
    inst.wait_vm("running", timeout=120)
    # every connection gone: the forwarder reports none open, the VM worker sees none
    inst.wait_bus(lambda s: (s.get("vm") or {}).get("connections") == 0
                  and ((s.get("vm") or {}).get("forwarder") or {}).get("open") == 0, 90,
                  "no connection left open")
    outcome, _s, detail = probe_banner(inst.port)
    assert outcome == "ok", detail
    after = usage(procs)
    report("fuzz-port", {"examples": kinds, "half_closed": half_closed, "vanished_mid_boot": 10,
                         "boot_to_all_closed_s": round(time.monotonic() - t0, 1),
                         "fds": {n: (before[n].fds, after[n].fds) for n in after}})
    assert_flat(before, after, rss_mib=16)
    assert os.path.exists(inst.config.runtime("qemu.pid.json"))
