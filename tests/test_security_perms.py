"""Permissions enforced inside the patterns with security on (deny by default).

Three real secured nodes on 127.0.0.1. Permission principals are the nodes' CURVE keys, so the
rules are known before the nodes (and their ids) exist. Each test has a positive control (an
allowed peer gets through on the same sockets) so "nothing arrived" cannot mean "broken".
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import MeshError
from mesh.node import Node
from mesh.security import SecurityConfig
from mesh.security.keys import generate_keypair, write_keypair
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.worker import Worker
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from patterns.reqrep.client import Client
from patterns.reqrep.service import Service
from tests.util import unique, wait_until

Perms = dict[str, tuple[str, ...]]


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = {n: generate_keypair() for n in ("a", "b", "c")}
        (tmp / "allow").mkdir()
        for n, kp in self.keys.items():
            write_keypair(tmp / "keys", n, kp)
            shutil.copy(tmp / "keys" / f"{n}.key", tmp / "allow" / f"{n}.key")
        self.name = unique("perm")
        self.nodes: list[Node] = []

    def pk(self, n: str) -> str:
        return self.keys[n].public

    def start(self, perms: dict[str, Perms]) -> tuple[Node, Node, Node]:
        """a is the seed; b and c dial it (and c dials b)."""
        out: dict[str, Node] = {}
        for n in ("a", "b", "c"):
            seeds = tuple(out[m].info().endpoints["control"][0] for m in out)
            keys = {out[m].info().endpoints["control"][0]: self.pk(m) for m in out}
            sec = SecurityConfig(key_file=self.tmp / "keys" / f"{n}.key_secret",
                                 allowlist_dir=self.tmp / "allow", peer_keys=keys,
                                 permissions=perms.get(n, {}))
            out[n] = Node(data_dir=self.tmp / n, name=n, mesh=self.name, mdns=False,
                          transports=("tcp",), interface="127.0.0.1", security=sec,
                          static_peers=seeds)
            self.nodes.append(out[n])
        a, b, c = out["a"], out["b"], out["c"]
        wait_until(lambda: all(x.peers.get(y.id) is not None for x in (a, b, c)
                               for y in (a, b, c) if x is not y), 10, what="3 nodes joined")
        return a, b, c

    def close(self) -> None:
        for nd in reversed(self.nodes):
            nd.close()


@pytest.fixture
def mesh3(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    yield m
    m.close()


def test_pubsub_unpermitted_peer_cannot_read_live_or_replay(mesh3: Mesh) -> None:
    pk = mesh3.pk
    # a publishes "secret" and "open"; b may read only "open"; c may read both.
    secret, opened = unique("secret"), unique("open")
    a, b, c = mesh3.start({
        "a": {pk("b"): ("subscribe:" + opened, "replay:" + opened),
              pk("c"): ("subscribe:*", "replay:*")},
        "b": {pk("a"): ("publish:*",)},
        "c": {pk("a"): ("publish:*",)},
    })
    with Publisher(a, secret) as ps, Publisher(a, opened) as po:
        ps.publish_many([b"classified-%d" % i for i in range(10)])
        po.publish_many([b"public-%d" % i for i in range(10)])
        with Subscriber(b, secret, start=Start.beginning()) as bs, \
                Subscriber(b, opened, start=Start.beginning()) as bo, \
                Subscriber(c, secret, start=Start.beginning()) as cs:
            got_c: list[Any] = []
            got_bo: list[Any] = []
            got_bs: list[Any] = []

            def progress() -> bool:
                ps.publish(b"classified-live")
                po.publish(b"public-live")
                got_c.extend(cs.recv_batch(timeout=0.02))
                got_bo.extend(bo.recv_batch(timeout=0.02))
                got_bs.extend(bs.recv_batch(timeout=0.02))
                return (any(e.data == b"classified-live" for e in got_c)
                        and any(e.data == b"public-live" for e in got_bo))

            # positive controls: c reads the secret stream, b reads the open one, live + replay
            wait_until(progress, 15, what="allowed subscribers got history and live data")
            assert [e.data for e in got_c[:10]] == [b"classified-%d" % i for i in range(10)]
            assert [e.data for e in got_bo[:10]] == [b"public-%d" % i for i in range(10)]
            hub = ps._hub  # type: ignore[attr-defined]
            wait_until(lambda: hub.refused_replays >= 1 and hub.refused_subscriptions >= 1, 5,
                       what="b's replay and subscription refused")
            got_bs.extend(bs.recv_batch(timeout=0.2))
            assert got_bs == []  # not one event of the secret stream reached b
            assert bs.stats().replay_errors >= 1
            assert a.stats().get("security_denied_replay", 0) >= 1
            assert a.stats().get("security_denied_subscribe", 0) >= 1


def test_pubsub_unpermitted_publisher_cannot_inject(mesh3: Mesh) -> None:
    pk = mesh3.pk
    # b subscribes to "t"; a may publish it, c may not (c holds a valid key: only the
    # permission is missing).
    a, b, c = mesh3.start({
        "a": {pk("b"): ("subscribe:*", "replay:*")},
        "c": {pk("b"): ("subscribe:*", "replay:*")},
        "b": {pk("a"): ("publish:*",), pk("c"): ("publish:other",)},
    })
    topic = unique("t")
    with Publisher(a, topic) as pa, Publisher(c, topic) as pc, \
            Subscriber(b, topic, start=Start.beginning()) as sb:
        got: list[Any] = []

        def progress() -> bool:
            pc.publish(b"forged")
            pa.publish(b"genuine")
            got.extend(sb.recv_batch(timeout=0.02))
            return sum(e.data == b"genuine" for e in got) >= 5

        wait_until(progress, 15, what="events of the allowed publisher")
        assert all(e.data == b"genuine" for e in got)
        assert sb.stats().forbidden >= 1
        assert b.stats().get("security_denied_publish", 0) >= 1


def test_pipeline_worker_without_work_and_producer_without_push(mesh3: Mesh) -> None:
    pk = mesh3.pk
    queue = unique("q")
    # a produces; b may not work (a's rules); c may. b allows a to push, c allows a too.
    a, b, c = mesh3.start({
        "a": {pk("c"): ("work:" + queue,)},
        "b": {pk("a"): ("push:*",)},
        "c": {pk("a"): ("push:*",)},
    })
    stop = threading.Event()
    seen: dict[str, list[bytes]] = {"b": [], "c": []}
    threads = []
    try:
        with WorkQueue(a, queue) as q, Worker(b, queue, credit=5) as wb, \
                Worker(c, queue, credit=5) as wc:
            for name, w in (("b", wb), ("c", wc)):
                th = threading.Thread(target=w.run,
                                      args=(lambda t, n=name: seen[n].append(t.payload),),
                                      kwargs={"stop": stop})
                th.start()
                threads.append(th)
            q.push_many([b"job-%d" % i for i in range(30)])
            wait_until(lambda: q.stats().get("acked") == 30, 15, what="30 acks by c")
            wait_until(lambda: q.stats().get("forbidden", 0) >= 1, 5, what="b's READY refused")
            assert seen["b"] == [] and len(seen["c"]) == 30
            assert a.stats().get("security_denied_work", 0) >= 1
            stop.set()
            for th in threads:
                th.join(5)
    finally:
        stop.set()
        for th in threads:
            th.join(5)


def test_worker_refuses_producer_without_push(mesh3: Mesh) -> None:
    pk = mesh3.pk
    queue = unique("q")
    a, b, c = mesh3.start({
        "a": {pk("b"): ("work:*",)},
        "c": {pk("b"): ("work:*",)},
        "b": {pk("c"): ("push:*",)},  # b takes tasks from c only
    })
    stop = threading.Event()
    seen: list[Any] = []
    try:
        with WorkQueue(a, queue) as qa, WorkQueue(c, queue) as qc, \
                Worker(b, queue, credit=5) as wb:
            th = threading.Thread(target=wb.run, args=(lambda t: seen.append(t.payload),),
                                  kwargs={"stop": stop})
            th.start()
            qa.push_many([b"from-a-%d" % i for i in range(5)])
            qc.push_many([b"from-c-%d" % i for i in range(5)])
            wait_until(lambda: qc.stats().get("acked") == 5, 15, what="c's tasks done by b")
            # a's tasks were pushed first: had b connected to a they would be done by now
            assert qa.stats().get("acked", 0) == 0
            assert all(p.startswith(b"from-c-") for p in seen)
            assert b.stats().get("security_denied_push", 0) >= 1
            stop.set()
            th.join(5)
    finally:
        stop.set()


def test_reqrep_caller_without_call_and_responder_without_serve(mesh3: Mesh) -> None:
    pk = mesh3.pk
    name = unique("svc")
    # a serves; b may call, c may not. b trusts a to serve; c would, but a refuses c.
    a, b, c = mesh3.start({
        "a": {pk("b"): ("call:" + name,)},
        "b": {pk("a"): ("serve:*",)},
        "c": {pk("a"): ("serve:*",)},
    })
    svc = Service(a, name, lambda req: {"ok": req.payload})
    try:
        wait_until(lambda: b.who_offers("service", name) and c.who_offers("service", name), 5)
        with Client(b) as cb:
            assert cb.request(name, 1, timeout=5.0) == {"ok": 1}
        with Client(c) as cc, pytest.raises(MeshError):
            cc.request(name, 2, timeout=0.8)
        assert svc.stats().forbidden >= 1 and svc.stats().executed == 1
        assert a.stats().get("security_denied_call", 0) >= 1
    finally:
        svc.close()


def test_reqrep_client_skips_responder_without_serve(mesh3: Mesh) -> None:
    pk = mesh3.pk
    name = unique("svc")
    a, b, c = mesh3.start({
        "a": {pk("b"): ("call:*",)},
        "c": {pk("b"): ("call:*",)},
        "b": {pk("c"): ("serve:" + name,)},  # b uses c's responder, never a's
    })
    sa = Service(a, name, lambda req: "from-a")
    sc = Service(c, name, lambda req: "from-c")
    try:
        wait_until(lambda: len(b.who_offers("service", name)) == 2, 5)
        with Client(b) as cb:
            assert {cb.request(name, i, timeout=5.0) for i in range(10)} == {"from-c"}
        assert sa.stats().received == 0
        assert b.stats().get("security_denied_serve", 0) >= 1
    finally:
        sa.close()
        sc.close()
