"""A peer back on the same data port with a new CURVE key is reached with the new key.

Data ports come from a range (``NodeConfig(data_ports=)``), so a node restarted after a key
rotation can bind the very port it had. Every connection a pattern holds was made with the
server key of its first handshake; libzmq keeps reconnecting with that key, and the peer, now
holding another key, refuses every attempt. A pattern must key its connections by endpoint
*and* server key and reconnect when the key changes. Here the range holds one port, so the
restarted node cannot help reusing it: for a service, a stream and a work queue, the long-lived
peer (which never restarts) must reach the rotated node again.
"""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from tests.util import unique, wait_until

ALL = {"*": ("*:*",)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mesh:
    """a: the long-lived node. b: restarted with another key, its data port fixed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = {n: generate_keypair() for n in ("a", "b_old", "b_new")}
        allow = tmp / "allow"
        allow.mkdir()
        for n, kp in self.keys.items():
            write_keypair(tmp / "keys", n, kp)
            shutil.copy(tmp / "keys" / f"{n}.key", allow / f"{n}.key")
        self.allow = allow
        self.name = unique("reuse")
        self.port = _free_port()
        self.a = Node(data_dir=tmp / "a", name="a", mesh=self.name, mdns=False,
                      transports=("tcp",), interface="127.0.0.1", security=self.sec("a"))
        self.ep = self.a.info().endpoints["control"][0]

    def sec(self, key: str, **kw: Any) -> SecurityConfig:
        return SecurityConfig(key_file=self.tmp / "keys" / f"{key}.key_secret",
                              allowlist_dir=self.allow, permissions=ALL, **kw)

    def b(self, key: str) -> Node:
        return Node(data_dir=self.tmp / "b", name="b", mesh=self.name, mdns=False,
                    transports=("tcp",), interface="127.0.0.1", static_peers=(self.ep,),
                    data_ports=(self.port, self.port),
                    security=self.sec(key, peer_keys={self.ep: self.keys["a"].public}))

    def learns_new_key(self, b: Node) -> Callable[[], bool]:
        new = self.keys["b_new"].public
        return lambda: (self.a.peers.get(b.id) is not None
                        and self.a.peers.get(b.id).public_key == new)  # type: ignore[union-attr]


@pytest.fixture
def m(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path)
    yield mesh
    mesh.a.close()


def _port_of(eps: tuple[str, ...] | list[str]) -> int:
    return int(next(e for e in eps if e.startswith("tcp://")).rsplit(":", 1)[1])


def test_service_on_same_port_with_new_key(m: Mesh) -> None:
    from patterns.reqrep import Client, Service

    svc = unique("svc")
    with Client(m.a) as ca:
        for key, tag in (("b_old", "one"), ("b_new", "two")):
            with m.b(key) as b, Service(b, svc, lambda req, t=tag: (t, req.payload)):
                assert _port_of(b.info().endpoints[f"rpc.{svc}"]) == m.port
                wait_until(m.learns_new_key(b) if key == "b_new" else
                           lambda: bool(m.a.who_offers("service", svc)), 10, what="b joined")
                assert ca.request(svc, 1, timeout=10.0) == [tag, 1]


def test_stream_on_same_port_with_new_key(m: Mesh) -> None:
    from patterns.pubsub import Publisher, Start, Subscriber

    topic = unique("rs") + ".s"
    got: list[Any] = []
    with Subscriber(m.a, topic, start=Start.beginning()) as sub:

        def pull(n: int) -> bool:
            got.extend(e.data for e in sub.recv_batch(timeout=0.05))
            return len(got) >= n

        for key, base in (("b_old", 0), ("b_new", 3)):
            with m.b(key) as b, Publisher(b, topic) as pub:
                assert _port_of(pub.endpoints) == m.port
                pub.publish_many(range(base, base + 3))
                wait_until(lambda n=base + 3: pull(n), 15,
                           what=lambda: f"got {got}, a's stats {sub.stats()}")
    assert got == list(range(6))


def test_queue_on_same_port_with_new_key(m: Mesh) -> None:
    from patterns.pipeline import Worker, WorkQueue

    q = unique("q")
    done: list[Any] = []
    stop = threading.Event()
    with Worker(m.a, q) as w:
        t = threading.Thread(target=w.run, args=(lambda task: done.append(task.payload),),
                             kwargs={"stop": stop}, daemon=True)
        t.start()
        try:
            for key, item in (("b_old", b"one"), ("b_new", b"two")):
                with m.b(key) as b, WorkQueue(b, q) as wq:
                    assert _port_of(wq.endpoints) == m.port
                    wq.push(item)
                    wait_until(lambda it=item: it in done, 15, what=lambda: f"done {done}")
        finally:
            stop.set()
            t.join(5)
    assert done == [b"one", b"two"]
