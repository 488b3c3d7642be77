"""Node core in one process: identity, lifecycle, control channel, gossip, hostile frames."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh import control
from mesh.errors import ClosedError, ConfigError, FrameTooLarge, PeerUnreachable, ProtocolError
from mesh.node import Node, NodeConfig, PresenceConfig
from mesh.peers import PeerEvent, PeerEventKind, PeerInfo, PeerState
from tests.util import unique, wait_until

FAST = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=1.0)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []
    mesh = unique("mesh")

    def make(name: str, **kw: Any) -> Node:
        kw.setdefault("mesh", mesh)
        kw.setdefault("presence", FAST)
        node = Node(data_dir=tmp_path / name, name=name, interface="127.0.0.1", mdns=False, **kw)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.close()


def control_ep(node: Node, scheme: str = "tcp") -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith(scheme))


def joined(a: Node, b: Node) -> bool:
    return a.peers.state(b.id) is PeerState.JOINED and b.peers.state(a.id) is PeerState.JOINED


def test_id_persists_across_restart(data_dir: Path) -> None:
    with Node(data_dir=data_dir, mdns=False, interface="127.0.0.1") as n:
        first = n.id
        assert len(first) == 32 and int(first, 16) >= 0
    with Node(data_dir=data_dir, mdns=False, interface="127.0.0.1") as n:
        assert n.id == first
    assert (data_dir / "node.id").read_text().strip() == first


def test_corrupt_id_file_is_a_config_error(data_dir: Path) -> None:
    (data_dir / "node.id").write_text("not-an-id\n")
    with pytest.raises(ConfigError, match="node id"):
        Node(data_dir=data_dir, mdns=False, interface="127.0.0.1")


@pytest.mark.parametrize(
    "kw",
    [
        {"mesh": ""},
        {"transports": ("udp",)},
        {"static_peers": ("http://x",)},
        {"hwm": 0},
        {"presence": None},
    ],
)
def test_bad_config_is_refused(data_dir: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        if kw.get("presence", 1) is None:
            PresenceConfig(heartbeat_s=1, evasive_s=0.5, gone_s=10)
        NodeConfig(data_dir=data_dir, **kw)


def test_close_leaves_no_thread_no_socket_and_is_idempotent(make_node: Callable[..., Node]) -> None:
    before = set(threading.enumerate())
    a = make_node("a")
    b = make_node("b", static_peers=(control_ep(a),))
    wait_until(lambda: joined(a, b), 5)
    socks = [s for n in (a, b) for s in n._factory.sockets]
    assert socks
    b.close()
    a.close()
    a.close()
    assert set(threading.enumerate()) <= before
    assert all(s.closed for s in socks)
    assert a.context.closed and b.context.closed
    with pytest.raises(ClosedError):
        a.send(b.id, "t.x", 1)
    with pytest.raises(ClosedError):
        a.socket(zmq.PUB, "x")


def test_two_nodes_static_peer_exchange_messages_both_ways(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    b = make_node("b", static_peers=(control_ep(a),))
    got_a: list[tuple[str, Any]] = []
    got_b: list[tuple[str, Any]] = []
    a.handle("t.msg", lambda p, body: got_a.append((p, body)))
    b.handle("t.msg", lambda p, body: got_b.append((p, body)))
    wait_until(lambda: joined(a, b), 5)
    assert a.peers.get(b.id) is not None and a.peers.get(b.id).name == "b"  # type: ignore[union-attr]
    for i in range(1000):
        b.send(a.id, "t.msg", {"i": i, "blob": b"x" * 10})
    a.send(b.id, "t.msg", [1, 2])
    wait_until(lambda: len(got_a) == 1000 and got_b, 5)
    assert [body["i"] for _, body in got_a] == list(range(1000))  # in order
    assert got_a[0][0] == b.id and got_b == [(a.id, [1, 2])]
    # Batched: fewer multiparts than messages is not observable, but counters are.
    assert a.stats()["control_in"] >= 1000 and b.stats()["control_out"] >= 1000


def test_three_nodes_learn_each_other_by_seed_gossip(make_node: Callable[..., Node]) -> None:
    b = make_node("b")
    a = make_node("a", seeds=(control_ep(b),))
    c = make_node("c", seeds=(control_ep(b),))
    wait_until(lambda: joined(a, c) and joined(a, b) and joined(b, c), 5)
    got: list[Any] = []
    c.handle("t.msg", lambda p, body: got.append((p, body)))
    a.send(c.id, "t.msg", "hi")
    wait_until(lambda: got == [(a.id, "hi")], 5)
    assert a.stats().get("gossip_dials", 0) + c.stats().get("gossip_dials", 0) >= 1


def test_offers_reach_peers_and_who_offers(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    b = make_node("b", static_peers=(control_ep(a),))
    wait_until(lambda: joined(a, b), 5)
    changed: list[PeerEvent] = []
    b.on_peer(changed.append)
    a.offer("stream", "sensors.temp")
    a.offer("service", "echo")
    wait_until(lambda: b.who_offers("stream", "sensors.temp"), 5)
    wait_until(lambda: b.who_offers("service", "echo"), 5)
    assert [p.node_id for p in b.who_offers("stream", prefix="sensors.")] == [a.id]
    assert b.who_offers("queue") == []
    assert any(e.kind is PeerEventKind.CHANGED for e in changed)
    a.withdraw("stream", "sensors.temp")
    wait_until(lambda: not b.who_offers("stream"), 5)
    with pytest.raises(ConfigError):
        a.offer("topic", "x")
    with pytest.raises(ConfigError):
        b.who_offers("bogus")


def test_send_errors_are_typed(make_node: Callable[..., Node]) -> None:
    a = make_node("a", max_message_bytes=1000)
    with pytest.raises(PeerUnreachable):
        a.send("f" * 32, "t.msg", 1)
    b = make_node("b", static_peers=(control_ep(a),))
    wait_until(lambda: joined(a, b), 5)
    with pytest.raises(ProtocolError):
        a.send(b.id, "ping", None)  # core kind
    with pytest.raises(ProtocolError):
        a.send(b.id, "Bad Kind", None)
    with pytest.raises(FrameTooLarge):
        a.send(b.id, "t.msg", b"x" * 2000)
    with pytest.raises(ProtocolError):
        a.send(b.id, "t.msg", object())
    with pytest.raises(ConfigError):
        a.handle("hello", lambda p, b: None)


def test_bye_on_close_is_left_at_once_and_restart_rejoins(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    slow = PresenceConfig(heartbeat_s=0.2, evasive_s=5, gone_s=20)
    a = make_node("a", presence=slow)
    events: list[PeerEvent] = []
    a.on_peer(events.append)
    b = make_node("b", presence=slow, static_peers=(control_ep(a),))
    b_id = b.id
    wait_until(lambda: joined(a, b), 5)
    t0 = time.monotonic()
    b.close()
    wait_until(lambda: a.peers.state(b_id) is PeerState.GONE, 3)
    assert time.monotonic() - t0 < 2  # the BYE, not the 20 s gone interval
    b2 = make_node("b", presence=slow, static_peers=(control_ep(a),))
    assert b2.id == b_id
    wait_until(lambda: joined(a, b2), 5)
    assert [e.kind for e in events if e.peer.node_id == b_id] == [
        PeerEventKind.JOINED, PeerEventKind.LEFT, PeerEventKind.JOINED
    ]


def test_idle_peers_stay_joined_and_silent_peer_goes(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    b = make_node("b", static_peers=(control_ep(a),))
    events: list[PeerEvent] = []
    a.on_peer(events.append)
    wait_until(lambda: joined(a, b), 5)
    a.reactor.run_sync(events.clear)  # the JOINED may land just after subscribing
    # Keepalives: across several evasive intervals of idleness nobody turns evasive.
    done = threading.Event()
    a.reactor.call_later(1.0, done.set)
    assert done.wait(5)
    assert joined(a, b) and not events
    # Freeze b's reactor (no sends, no receives): a must see it evasive, then gone.
    release = threading.Event()
    b.reactor.call_soon(release.wait, 10)
    t0 = time.monotonic()
    wait_until(lambda: a.peers.state(b.id) is PeerState.GONE, 5)
    elapsed = time.monotonic() - t0
    assert elapsed < FAST.gone_s + 2 * FAST.heartbeat_s + 0.5
    assert [e.kind for e in events] == [PeerEventKind.EVASIVE, PeerEventKind.LEFT]
    release.set()
    # b wakes up, its traffic makes it joined again at a.
    wait_until(lambda: a.peers.state(b.id) is PeerState.JOINED, 5)
    assert events[-1].kind is PeerEventKind.JOINED


def test_peer_events_iterators_sync_and_async(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    it = a.peer_events(timeout=5)
    b = make_node("b", static_peers=(control_ep(a),))
    ev = next(it)
    assert ev.kind is PeerEventKind.JOINED and ev.peer.node_id == b.id

    async def first_async() -> PeerEvent:
        agen = a.apeer_events()
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)  # let the generator subscribe
        while not a._subscribers[-1:]:
            await asyncio.sleep(0.01)
        c = make_node("c", static_peers=(control_ep(a),))
        ev = await asyncio.wait_for(task, 5)
        assert ev.peer.node_id == c.id
        await agen.aclose()
        return ev

    assert asyncio.run(first_async()).kind is PeerEventKind.JOINED
    # Closing the node ends a blocked iterator.
    it2 = a.peer_events()
    t = threading.Thread(target=lambda: list(it2))
    t.start()
    a.close()
    t.join(5)
    assert not t.is_alive()


def test_ipc_is_preferred_on_the_same_host(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    eps = a.info().endpoints["control"]
    assert any(e.startswith("ipc://") for e in eps) and any(e.startswith("tcp://") for e in eps)
    assert all(len(e) < 110 for e in eps)
    same = PeerInfo(node_id="a" * 32, name="x", mesh="m", host=a.host, endpoints={"control": eps})
    other = PeerInfo(node_id="a" * 32, name="x", mesh="m", host="elsewhere", endpoints=same.endpoints)
    assert a.connect_endpoint(same, "control").startswith("ipc://")  # type: ignore[union-attr]
    assert a.connect_endpoint(other, "control").startswith("tcp://")  # type: ignore[union-attr]
    assert a.connect_endpoint(other, "pub") is None
    b = make_node("b", static_peers=(control_ep(a),))
    wait_until(lambda: joined(a, b), 5)
    # a learnt b from its HELLO and connected back over ipc.
    assert a._channel.links[b.id].endpoint.startswith("ipc://")


def test_node_socket_applies_options_and_bind_announces(make_node: Callable[..., Node]) -> None:
    a = make_node("a", hwm=123, linger_ms=7)
    s = a.socket(zmq.PUB, "pub")
    assert s.getsockopt(zmq.SNDHWM) == 123 and s.getsockopt(zmq.LINGER) == 7
    eps = a.bind(s, "pub")
    assert a.info().endpoints["pub"] == eps and len(eps) == 2
    eps2 = a.bind(a.socket(zmq.PUB, "pub"), "pub")  # a second socket of the same role
    assert set(eps).isdisjoint(eps2) and len(a.info().endpoints["pub"]) == 4


def test_hostile_frames_are_counted_and_node_keeps_working(
    make_node: Callable[..., Node], zctx: zmq.Context[Any]
) -> None:
    a = make_node("a")
    raw = zctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(control_ep(a))
    fake_id = "e" * 32
    impostor = zctx.socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.setsockopt(zmq.ROUTING_ID, fake_id.encode())
    impostor.connect(control_ep(a))
    try:
        raw.send(b"garbage")  # one frame
        raw.send_multipart([b"ZM\x01\x04ping"])  # odd count
        raw.send_multipart([b"XX\x01\x04ping", b"\xc0"])  # bad signature
        raw.send_multipart([b"ZM\x09\x04ping", b"\xc0"])  # unknown major version
        raw.send_multipart([control.encode_header("ping"), b"\xc0"])  # never said HELLO
        raw.send_multipart([control.encode_header("t.msg"), b"\xc1"])  # undecodable body
        info = PeerInfo(node_id=fake_id, name="evil", mesh="other-mesh")
        hello = control.hello_to_wire(control.Hello(info))
        impostor.send_multipart([control.encode_header("hello"), msgpack.packb(hello)])
        bad_hello = {"info": {"node_id": fake_id}}
        impostor.send_multipart([control.encode_header("hello"), msgpack.packb(bad_hello)])
        # A HELLO claiming another node id than the connection's routing id.
        spoof = control.hello_to_wire(control.Hello(PeerInfo(node_id="d" * 32, name="x", mesh=a.mesh)))
        impostor.send_multipart([control.encode_header("hello"), msgpack.packb(spoof)])
        impostor.send_multipart([b"ZM\x01\x04ping", msgpack.packb(None)] * 3)
        wait_until(
            lambda: a.stats().get("malformed", 0) >= 6
            and a.stats().get("unsupported_version", 0) >= 1
            and a.stats().get("unknown_sender", 0) >= 4
            and a.stats().get("wrong_mesh", 0) >= 1,
            5,
            what=lambda: a.stats(),
        )
        assert a.peers.get(fake_id) is None and a.reactor.errors == 0
        # Still works for real peers.
        b = make_node("b", static_peers=(control_ep(a),))
        got: list[Any] = []
        a.handle("t.msg", lambda p, body: got.append(body))
        wait_until(lambda: joined(a, b), 5)
        b.send(a.id, "t.msg", "still alive")
        b.send(a.id, "t.unhandled", 1)
        wait_until(lambda: got == ["still alive"] and a.stats().get("unhandled_kind"), 5)
    finally:
        raw.close()
        impostor.close()


def test_raising_handler_and_callback_are_counted(make_node: Callable[..., Node]) -> None:
    a = make_node("a")
    a.on_peer(lambda ev: 1 / 0)  # type: ignore[func-returns-value]
    a.handle("t.boom", lambda p, b: 1 / 0)  # type: ignore[func-returns-value]
    got: list[Any] = []
    a.handle("t.ok", lambda p, b: got.append(b))
    b = make_node("b", static_peers=(control_ep(a),))
    wait_until(lambda: joined(a, b), 5)
    b.send(a.id, "t.boom", 1)
    b.send(a.id, "t.ok", 2)
    wait_until(lambda: got == [2], 5)
    st = a.stats()
    assert st["handler_errors"] == 1 and st["callback_errors"] >= 1
