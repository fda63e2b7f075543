"""The bus protocol over real ZeroMQ ipc sockets in a temp dir (no processes)."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Iterator

import pytest
import zmq
import zmq.asyncio

from virby.core import protocol
from virby.core.config import Config, from_dict
from virby.workers import bus


@pytest.fixture
def config() -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="vbus", dir="/tmp") as d:
        yield from_dict({"runtimeDir": d, "stateDir": d})


def frames(body: dict, topic: str = "vm") -> list[bytes]:
    return [topic.encode(), json.dumps(body).encode()]


GOOD = {"v": 1, "kind": "state", "from": "vm", "inc": "1-2.0", "seq": 3, "t": 1.0,
        "data": {"state": "running"}}


def test_decode_accepts_a_good_message() -> None:
    msg = bus.decode(frames(GOOD))
    assert (msg.sender, msg.kind, msg.seq, msg.data) == ("vm", "state", 3, {"state": "running"})
    assert bus.decode(msg.encode()) == msg


def test_decode_takes_a_relayed_forwarder_state() -> None:
    relayed = {"state": "running", "forwarder": {"open": 2, "accepted": 9, "peers": {}}}
    assert bus.decode(frames({**GOOD, "data": relayed})).data == relayed


def test_decode_takes_every_vm_state() -> None:
    for state in protocol.VM_STATES:
        assert bus.decode(frames({**GOOD, "data": {"state": state}})).data["state"] == state


@pytest.mark.parametrize(("frames_", "reason"), [
    ([b"vm"], "expected 2 frames"),
    ([b"vm", b"{"], "not JSON"),
    ([b"vm", b"[]"], "not an object"),
    (frames({**GOOD, "v": 2}), "unsupported version"),
    (frames({**GOOD, "from": "evil"}, "evil"), "unknown sender"),
    (frames(GOOD, "idle"), "unknown sender"),
    (frames({**GOOD, "kind": "command"}), "unknown kind"),
    (frames({**GOOD, "inc": ""}), "bad incarnation"),
    (frames({**GOOD, "seq": -1}), "bad sequence"),
    (frames({**GOOD, "seq": True}), "bad sequence"),
    (frames({**GOOD, "t": "now"}), "bad time"),
    (frames({**GOOD, "data": []}), "data is not an object"),
    # the data of each message kind is typed: the reason names the field
    (frames({**GOOD, "data": {"state": "runing"}}), "field 'state'"),
    (frames({**GOOD, "data": {"state": "running", "phase": "dreaming"}}), "field 'phase'"),
    (frames({**GOOD, "data": {"boots": "3"}}), "field 'boots'"),
    (frames({**GOOD, "data": {"woken_at": True}}), "field 'woken_at'"),
    (frames({**GOOD, "from": "idle", "data": {"decision_code": "maybe"}}, "idle"), "field 'decision_code'"),
    (frames({**GOOD, "from": "idle", "data": {"vm": "asleep"}}, "idle"), "field 'vm'"),
    (frames({**GOOD, "from": "forwarder", "data": {"open": -0.5}}, "forwarder"), "field 'open'"),
    (frames({**GOOD, "kind": "event", "data": {"event": 7}}), "field 'event'"),
    # the forwarder's state the vm worker relays is checked as the forwarder's own
    (frames({**GOOD, "data": {"forwarder": {"accepted": "many"}}}), "field 'forwarder'"),
    (frames({**GOOD, "data": {"forwarder": [1]}}), "field 'forwarder'"),
    ([b"vm", b" " * (bus.MAX_MESSAGE + 1)], "over"),
])
def test_decode_rejects_with_a_reason(frames_: list[bytes], reason: str) -> None:
    with pytest.raises(bus.BadMessage, match=reason):
        bus.decode(frames_)


@pytest.mark.parametrize(("body", "reason"), [
    (b"nope", "not JSON"),
    (b'{"v": 9, "id": "x", "cmd": "wake"}', "version"),
    (b'{"v": 1, "cmd": "wake"}', "without an id"),
    (b'{"v": 1, "id": "x", "cmd": "format-disk"}', "unknown command"),
    (b'{"v": 1, "id": "x", "cmd": "wake", "args": [1]}', "args"),
])
def test_requests_are_validated(body: bytes, reason: str) -> None:
    with pytest.raises(bus.BadMessage, match=reason):
        bus.decode_request(body)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_nodes_see_each_other_and_replay_state_on_subscribe(config: Config) -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        seen: list[tuple[str, object]] = []
        vm = bus.Node("vm", config, ctx=ctx)
        vm.state = {"state": "running"}
        await vm.start()
        # The idle node starts later: it still gets vm's state at once (last-value replay).
        idle = bus.Node("idle", config, lambda m, p, r: seen.append((m.sender, m.data.get("state"))),
                        ctx=ctx)
        await idle.start()
        fwd = bus.Node("forwarder", config, ctx=ctx)
        fwd.state = {"open": 2}
        await fwd.start()
        for _ in range(200):
            if idle.peers["vm"].up and idle.peers["forwarder"].up and vm.peers["forwarder"].up \
                    and fwd.peers["vm"].up and fwd.peers["idle"].up:
                break
            await asyncio.sleep(0.01)
        assert ("vm", "running") in seen
        assert idle.peers["vm"].inc == vm.inc
        assert vm.peers["forwarder"].state["open"] == 2  # forwarder -> vm.in inbox
        assert idle.peers["forwarder"].state["open"] == 2  # forwarder -> idle.in inbox
        assert fwd.peers["idle"].inc == idle.inc
        for n in (fwd, idle, vm):
            await n.close()
        ctx.term()

    run(scenario())


def test_control_request_reply_and_timeout(config: Config) -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        wake_waiting, status_answered = asyncio.Event(), asyncio.Event()

        async def handle(cmd: str, args: dict) -> tuple[bool, str | None, dict]:
            if cmd == "start":
                return True, None, {"state": "running", "args": args}
            if cmd == "wake":
                # A wake that waits for a boot: it ends only once a status was answered
                # meanwhile, so a server that serialises requests never answers either.
                wake_waiting.set()
                await status_answered.wait()
                return True, None, {"state": "running"}
            status_answered.set()
            return False, "nope", {}

        server = bus.ControlServer(config, handle, ctx=ctx)
        server.start()
        reply = await bus.request(config, "start", {"wait": 1}, timeout=2, ctx=ctx)
        assert reply["ok"] and reply["state"] == {"state": "running", "args": {"wait": 1}}
        # A slow command does not hold up another one sent meanwhile.
        wake = asyncio.create_task(bus.request(config, "wake", timeout=5, ctx=ctx))
        await asyncio.wait_for(wake_waiting.wait(), 5)
        status = await bus.request(config, "status", timeout=5, ctx=ctx)
        assert not status["ok"] and status["error"] == "nope"
        assert (await wake)["ok"]
        await server.close()
        with pytest.raises(bus.RequestError, match="no answer from the vm worker"):
            await bus.request(config, "status", timeout=0.2, ctx=ctx)
        ctx.term()

    run(scenario())


def test_garbage_is_dropped_and_logged_once(config: Config, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        got: list[bus.Message] = []
        vm = bus.Node("vm", config, lambda m, p, r: got.append(m), ctx=ctx)
        await vm.start()
        pub = ctx.socket(zmq.PUB)
        pub.connect(config.endpoint("vm.in"))
        good = bus.Message("state", "forwarder", "9-9.0", 1, 1.0, {"open": 0})
        for _ in range(200):  # until the inbox has our subscription
            await pub.send_multipart([b"forwarder", b"garbage"])
            if vm.drops.dropped:
                break
            await asyncio.sleep(0.01)
        for i in range(50):
            await pub.send_multipart([b"forwarder", b"garbage %d" % i])
        await pub.send_multipart(good.encode())
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert [m.data for m in got] == [{"open": 0}]
        assert vm.drops.dropped >= 51
        pub.close(0)
        await vm.close()
        ctx.term()

    with caplog.at_level(logging.WARNING, logger="virby.bus"):
        run(scenario())
    drops = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert len(drops) == 1


def test_a_request_ends_when_the_vm_worker_is_replaced(config: Config) -> None:
    """Issue 20: the idle monitor's stop request sat out its 60 s timeout after a kill -9 of
    the vm worker that took it. A request now ends as soon as the caller sees a new
    incarnation of the vm worker."""
    async def t() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)  # takes the request, never answers (a killed worker)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(config.endpoint("vm.ctl"))
        peer = bus.Peer("vm", inc="100-1.0")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, setattr, peer, "inc", "200-2.0")
        # the reason names the replacement: a timeout would say it gave up after 60 s
        with pytest.raises(bus.RequestError, match="replaced while it handled stop"):
            await bus.request(config, "stop", timeout=60, ctx=ctx, peer=peer)
        router.close(linger=0)
        ctx.term()

    asyncio.run(t())


def test_a_node_publishes_its_state_source_on_change_only(config: Config) -> None:
    """No heartbeat runs in this test (it would come after an hour): every state the listener
    sees was sent because it changed, or as the replay to its subscription."""
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        seen: list[dict] = []
        got = asyncio.Event()

        def hear(m: bus.Message, p: bus.Peer, r: bool) -> None:
            if m.kind == "state":
                seen.append(dict(m.data))
                got.set()

        async def next_state() -> dict:
            await asyncio.wait_for(got.wait(), 5)
            got.clear()
            return seen[-1]

        source = {"decision": "idle; next step in 9s", "decision_code": "counting-down", "stop_at": 9.0}
        idle = bus.Node("idle", config, ctx=ctx, volatile=("decision",))
        idle.use_state(lambda: source)
        await idle.start()
        vm = bus.Node("vm", config, hear, ctx=ctx)
        await vm.start()
        assert (await next_state())["stop_at"] == 9.0  # the replay on subscription
        while not (idle.peers["vm"].up and vm.peers["idle"].up):  # each one's first sight of
            await next_state()  # the other is news too (its peers view), then all is quiet
        seen.clear()
        source["decision"] = "idle; next step in 8s"  # volatile: waits for the heartbeat
        idle.changed()
        source.update(decision_code="busy", decision="1 connection(s) open", stop_at=None)
        idle.changed()
        assert (await next_state())["decision_code"] == "busy"
        idle.changed()  # nothing changed: nothing sent
        source["stop_at"] = 20.0
        idle.changed()
        assert (await next_state())["stop_at"] == 20.0
        assert [(s["decision_code"], s["stop_at"]) for s in seen] == [("busy", None), ("busy", 20.0)]
        for n in (vm, idle):
            await n.close()
        ctx.term()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bus, "EARLY_BEATS", ())
        mp.setattr(bus, "HEARTBEAT", 3600.0)
        run(scenario())
