"""Every pattern over CURVE on real nodes: pub/sub (live + replay), pipeline, request/reply,
and mDNS discovery with security on. Real sockets on 127.0.0.1, real files."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import Keypair, generate_keypair, write_keypair
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.worker import Worker
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from patterns.reqrep.client import Client
from patterns.reqrep.service import Service
from tests.util import unique, wait_until

ALL = {"*": ("*:*",)}


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, Keypair]]:
    ks = {n: generate_keypair() for n in ("a", "b", "c")}
    (tmp_path / "allow").mkdir()
    for n, kp in ks.items():
        write_keypair(tmp_path / "keys", n, kp)
        shutil.copy(tmp_path / "keys" / f"{n}.key", tmp_path / "allow" / f"{n}.key")
    yield ks


def sec(tmp: Path, name: str, perms: Any = None, **kw: Any) -> SecurityConfig:
    return SecurityConfig(key_file=tmp / "keys" / f"{name}.key_secret",
                          allowlist_dir=tmp / "allow",
                          permissions=ALL if perms is None else perms, **kw)


def ctrl(nd: Node) -> str:
    return nd.info().endpoints["control"][0]


def node(tmp: Path, name: str, mesh: str, s: SecurityConfig, **kw: Any) -> Node:
    return Node(data_dir=tmp / name, name=name, mesh=mesh, mdns=kw.pop("mdns", False),
                transports=("tcp",), interface="127.0.0.1", security=s, **kw)


def pair(tmp: Path, keys: dict[str, Keypair], pa: Any = None,
         pb: Any = None) -> tuple[Node, Node]:
    m = unique("sp")
    a = node(tmp, "a", m, sec(tmp, "a", pa))
    ep = ctrl(a)
    b = node(tmp, "b", m, sec(tmp, "b", pb, peer_keys={ep: keys["a"].public}),
             static_peers=(ep,))
    wait_until(lambda: a.peers.get(b.id) is not None and b.peers.get(a.id) is not None, 5,
               what="secure join")
    return a, b


def test_pubsub_live_and_replay_over_curve(tmp_path: Path, keys: dict[str, Keypair]) -> None:
    a, b = pair(tmp_path, keys)
    try:
        stream = unique("s")
        with Publisher(a, stream) as pub:
            pub.publish_many([{"i": i} for i in range(50)])
            with Subscriber(b, stream, start=Start.beginning()) as sub:
                got: list[Any] = []
                wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.1)), len(got) >= 50)[1],
                           10, what="replayed history over CURVE")
                assert [e.data for e in got[:50]] == [{"i": i} for i in range(50)]
                wait_until(lambda: (pub.publish("live"), got.extend(sub.recv_batch(timeout=0.1)),
                                    any(e.data == "live" for e in got))[2], 10, what="live")
        assert a.stats().get("security_handshake_failed_auth", 0) == 0
    finally:
        b.close()
        a.close()


def test_pipeline_over_curve(tmp_path: Path, keys: dict[str, Keypair]) -> None:
    a, b = pair(tmp_path, keys)
    stop = threading.Event()
    seen: list[bytes] = []
    try:
        queue = unique("q")
        with WorkQueue(a, queue) as q, Worker(b, queue, credit=5) as w:
            th = threading.Thread(target=w.run, args=(lambda t: seen.append(t.payload),),
                                  kwargs={"stop": stop})
            th.start()
            q.push_many([b"task-%d" % i for i in range(20)])
            wait_until(lambda: q.stats().get("acked") == 20, 10, what="20 acks over CURVE")
            stop.set()
            th.join(5)
        assert sorted(seen) == sorted(b"task-%d" % i for i in range(20))
    finally:
        stop.set()
        b.close()
        a.close()


def test_reqrep_over_curve(tmp_path: Path, keys: dict[str, Keypair]) -> None:
    a, b = pair(tmp_path, keys)
    try:
        name = unique("svc")
        with Service(a, name, lambda req: {"echo": req.payload}):
            wait_until(lambda: b.who_offers("service", name), 5, what="service seen")
            with Client(b) as client:
                assert client.request(name, 41, timeout=5.0) == {"echo": 41}
    finally:
        b.close()
        a.close()


def test_mdns_discovery_with_security(tmp_path: Path, keys: dict[str, Keypair]) -> None:
    m = unique("mdns")
    with node(tmp_path, "a", m, sec(tmp_path, "a"), mdns=True) as a, \
            node(tmp_path, "b", m, sec(tmp_path, "b"), mdns=True) as b:
        wait_until(lambda: a.peers.get(b.id) is not None and b.peers.get(a.id) is not None, 10,
                   what="secure peers found by mDNS")
        assert b.peers.get(a.id).public_key == keys["a"].public  # type: ignore[union-attr]
        name = unique("svc")
        with Service(a, name, lambda req: req.payload * 2):
            wait_until(lambda: b.who_offers("service", name), 5, what="service seen")
            with Client(b) as client:
                assert client.request(name, 21, timeout=5.0) == 42


class LoopbackCapture:
    """Every frame on ``lo`` (AF_PACKET, root) while active: a real wire capture."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.05)
        self.buf = bytearray()
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.buf += self.sock.recv(65535)
            except TimeoutError:
                continue

    def close(self) -> bytes:
        self.stop.set()
        self.th.join(5)
        self.sock.close()
        return bytes(self.buf)


@pytest.mark.parametrize("secure", [False, True])
def test_wire_capture_of_every_pattern(tmp_path: Path, keys: dict[str, Keypair],
                                       secure: bool) -> None:
    """With CURVE no payload byte of pub/sub, pipeline or reqrep appears on the wire; the
    plaintext run on the same capture is the control that shows the capture sees payloads."""
    try:
        cap = LoopbackCapture()
    except (PermissionError, OSError) as exc:
        pytest.skip(f"no AF_PACKET capture here: {exc}")
    marks = {p: unique(f"MARK-{p}-").encode() for p in ("pubsub", "pipeline", "reqrep")}
    if secure:
        a, b = pair(tmp_path, keys)
    else:
        m = unique("plain")
        a = Node(data_dir=tmp_path / "a", name="a", mesh=m, mdns=False, transports=("tcp",),
                 interface="127.0.0.1")
        b = Node(data_dir=tmp_path / "b", name="b", mesh=m, mdns=False, transports=("tcp",),
                 interface="127.0.0.1", static_peers=(ctrl(a),))
        wait_until(lambda: a.peers.get(b.id) and b.peers.get(a.id), 5)
    stop = threading.Event()
    try:
        stream, queue, name = unique("s"), unique("q"), unique("svc")
        with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
            pub.publish(marks["pubsub"])
            got: list[Any] = []
            wait_until(lambda: (got.extend(sub.recv_batch(timeout=0.05)), got)[1], 10)
            assert got[0].data == marks["pubsub"]
        seen: list[bytes] = []
        with WorkQueue(a, queue) as q, Worker(b, queue, credit=5) as w:
            th = threading.Thread(target=w.run, args=(lambda t: seen.append(t.payload),),
                                  kwargs={"stop": stop})
            th.start()
            q.push(marks["pipeline"])
            wait_until(lambda: q.stats().get("acked") == 1, 10)
            stop.set()
            th.join(5)
        assert seen == [marks["pipeline"]]
        with Service(a, name, lambda req: req.payload):
            wait_until(lambda: b.who_offers("service", name), 5)
            with Client(b) as client:
                assert client.request(name, marks["reqrep"], timeout=5.0) == marks["reqrep"]
    finally:
        stop.set()
        wire = cap.close()
        b.close()
        a.close()
    assert len(wire) > 1000
    for p, mark in marks.items():
        assert (mark in wire) is (not secure), (p, secure)
