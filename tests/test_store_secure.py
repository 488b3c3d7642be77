"""Replicated streams under CURVE: a store needs the ``replicate`` permission on the stream.
Without it, its acks do not count for ``Publisher(replicas=k)`` and subscribers never read
from it; with it, both work (real nodes, CURVE sockets, allowlist and permission rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.envelope import Event, decode, encode
from mesh.errors import ReplicationTimeout
from mesh.node import Node
from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.store import Store
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import CurveHub, unique, wait_until

NAMES = ("hub", "pub", "good", "bad", "sub")


def _forge(env: bytes) -> bytes:
    return encode(decode(env).replace(data=b"forged"))


def test_only_a_store_allowed_to_replicate_counts_and_serves(tmp_path: Path) -> None:
    cm = CurveHub(tmp_path, NAMES)
    keys = cm.keys
    perms = {"*": ["publish:*", "subscribe:*", "replay:*"],
             keys["good"].public: ["replicate:*"]}
    stream = unique("s").replace("-", "")

    def node(name: str, hub_ep: str | None) -> Node:
        return cm.node(name, perms, hub_ep)

    try:
        hub = node("hub", None)
        ep = hub.info().endpoints["control"][0]
        bad_node = node("bad", ep)
        bad = Store(bad_node, topics=(stream,), tamper=_forge)
        pn = node("pub", ep)
        wait_until(lambda: pn.who_offers("service", name=frames.STORE_SERVICE), 10)
        with Publisher(pn, stream, replicas=1, replica_timeout_s=1.0, heartbeat_s=0.1,
                       resume_from_stores=0) as pub:
            with pytest.raises(ReplicationTimeout):
                pub.publish(b"e0")
            # The bad store did copy it (it may subscribe), but its acks are refused.
            wait_until(lambda: [h.head for h in bad.holdings()] == [1], 10)
            assert pub.stats().replicated == {}
            good_node = node("good", ep)
            good = Store(good_node, topics=(stream,))
            pub.wait_replicated(0, 20)
            assert set(pub.stats().replicated) == {good_node.id}
            for i in range(1, 10):
                pub.publish(f"e{i}".encode())
        pn.close()
        wait_until(lambda: not hub.who_offers("stream", name=stream), 10, what="origin gone")
        good.close()
        # Only the store that may not replicate is up: the subscriber asks it what it holds
        # (several times) but never reads from it.
        asked = bad.stats().holdings_answers
        sub = Subscriber(node("sub", ep), stream, start=Start.beginning())
        wait_until(lambda: sub.recv(timeout=0.05) is not None
                   or bad.stats().holdings_answers >= asked + 3, 20)
        assert bad.stats().fetches == 0 and sub.stats().delivered == 0
        good = Store(good_node, topics=(stream,))  # back: the subscriber reads from it
        got: list[Event] = []
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 10, 20,
                   what=lambda: (len(got), sub.stats()))
        assert [e.data for e in got] == [f"e{i}".encode() for i in range(10)]
        assert bad.stats().fetches == 0  # never asked: it may not replicate this stream
        sub.close()
    finally:
        cm.close()


