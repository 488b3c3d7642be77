"""What users expect of pub/sub: same-node delivery, Start.new for streams that
appear later, and forgetting publishers that left. Real nodes on 127.0.0.1 (mdns off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.node import Node
from mesh.state import StateStore
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import ctrl, drain, make_node, unique, wait_until


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    nd = make_node(tmp_path / "n", unique("sn"))
    yield nd
    nd.close()


# --- 6. same-node delivery ----------------------------------------------------------------------

def test_same_node_durable_backlog_live_and_cursor(node: Node) -> None:
    stream = unique("same")
    with Publisher(node, stream) as pub:
        pub.publish_many(range(100))
        with Subscriber(node, stream, durable="local") as sub:
            got = drain(sub, 100)  # the backlog: replayed by the node's own hub
            assert [e.data for e in got] == list(range(100))
            for i in range(100, 200):
                pub.publish(i)  # live, over the node's own data socket
            got = drain(sub, 100)
            assert [e.data for e in got] == list(range(100, 200))
            assert sub.stats().replayed >= 100
        with Subscriber(node, stream, durable="local") as sub:  # restart
            assert sub.positions()[(node.id, stream)] == 200
            pub.publish(200)
            ev = sub.recv(timeout=5)
            assert ev is not None and ev.data == 200


def test_same_node_publisher_created_after_subscriber(node: Node) -> None:
    stream = unique("later")
    # Start.new (ephemeral); the publisher comes after the subscriber.
    with Subscriber(node, stream) as sub, Publisher(node, stream) as pub:
        for i in range(50):
            pub.publish(i)  # at once: before the subscriber even knows the stream
        got = drain(sub, 50)
        assert [e.data for e in got] == list(range(50))


# --- 7. Start.new for streams first seen later --------------------------------------------------

def test_start_new_gets_every_event_of_a_stream_that_appears_later(tmp_path: Path) -> None:
    mesh = unique("sn")
    a = make_node(tmp_path / "a", mesh)
    b = make_node(tmp_path / "b", mesh, (ctrl(a),))
    try:
        wait_until(lambda: a.id in {p.node_id for p in b.peers.list()}, 5, what="peering")
        prefix = unique("late") + "."
        with Subscriber(b, prefix, start=Start.new()) as sub:
            # Streams appear after the subscriber: they publish at once, before any offer,
            # heartbeat or SUB connection could have reached the subscriber.
            with Publisher(a, prefix + "x") as px, Publisher(a, prefix + "y") as py:
                for i in range(100):
                    px.publish(i)
                    py.publish(-i)
                got = drain(sub, 200)
            xs = [e.data for e in got if e.stream == prefix + "x"]
            ys = [e.data for e in got if e.stream == prefix + "y"]
            assert xs == list(range(100))
            assert ys == [-i for i in range(100)]
    finally:
        b.close()
        a.close()


def test_start_new_stream_present_at_start_begins_at_its_head(tmp_path: Path) -> None:
    mesh = unique("sn")
    a = make_node(tmp_path / "a", mesh)
    b = make_node(tmp_path / "b", mesh, (ctrl(a),))
    stream = unique("head")
    try:
        with Publisher(a, stream) as pub:
            pub.publish_many(range(10))
            wait_until(lambda: any(stream in p.offers.get("stream", ())
                                   for p in b.peers.list()), 5, what="offer seen")
            with Subscriber(b, stream, start=Start.new()) as sub:
                wait_until(lambda: sub.stats().heartbeats > 0 or sub.recv(timeout=0.05)
                           is not None, 5, what="heartbeat")
                pub.publish("live")
                ev = sub.recv(timeout=5)
                assert ev is not None and ev.data == "live"  # nothing of the old backlog
    finally:
        b.close()
        a.close()


# --- 8. forget publishers that left -------------------------------------------------------------

def test_publisher_that_left_is_forgotten_then_its_cursor_rows(tmp_path: Path) -> None:
    mesh = unique("fg")
    a = make_node(tmp_path / "a", mesh)
    b = make_node(tmp_path / "b", mesh, (ctrl(a),))
    stream = unique("gone")
    a_id = a.id
    try:
        wait_until(lambda: a.id in {p.node_id for p in b.peers.list()}, 5, what="peering")
        with Subscriber(b, stream, durable="f", forget_after_s=0.2,
                        forget_cursors_after_s=0.6) as sub:
            with Publisher(a, stream) as pub:
                pub.publish_many(range(5))
                assert [e.data for e in drain(sub, 5)] == list(range(5))
                sub.commit()
                assert sub.stats().streams == 1
            a.close()  # the publisher's node leaves the mesh (goodbye)
            wait_until(lambda: sub.recv(timeout=0.05) is None and sub.stats().streams == 0,
                       5, what="tracker dropped")
            assert a_id not in sub._peer_eps and not sub._connected
            assert sub.positions() == {(a_id, stream): 5}  # the cursor outlives the tracker
            wait_until(lambda: sub.recv(timeout=0.05) is None and not sub.positions(), 5,
                       what="cursor rows forgotten")
        with StateStore(tmp_path / "b" / "pubsub-cursors.db") as st:
            assert list(st.items("pubsub.cursor.f")) == []
            assert list(st.items("pubsub.gone.f")) == []
    finally:
        b.close()
        a.close()


def test_forget_deletes_cursor_rows_now(tmp_path: Path) -> None:
    mesh = unique("fg")
    a = make_node(tmp_path / "a", mesh)
    b = make_node(tmp_path / "b", mesh, (ctrl(a),))
    stream = unique("fg")
    try:
        wait_until(lambda: a.id in {p.node_id for p in b.peers.list()}, 5, what="peering")
        with Publisher(a, stream) as pub:
            pub.publish_many(range(3))
            with Subscriber(b, stream, durable="f") as sub:
                assert len(drain(sub, 3)) == 3
                sub.commit()
                sub.forget(a.id)
                assert sub.positions() == {} and sub.stats().streams == 0
        with StateStore(tmp_path / "b" / "pubsub-cursors.db") as st:
            assert list(st.items("pubsub.cursor.f")) == []
    finally:
        b.close()
        a.close()


def test_same_node_delivery_over_curve(tmp_path: Path) -> None:
    from mesh.security import SecurityConfig
    from mesh.security.keys import generate_keypair, write_keypair

    kp = generate_keypair()
    write_keypair(tmp_path / "keys", "a", kp)
    (tmp_path / "allow").mkdir()
    (tmp_path / "allow" / "a.key").write_bytes((tmp_path / "keys" / "a.key").read_bytes())
    cfg = SecurityConfig(key_file=tmp_path / "keys" / "a.key_secret",
                         allowlist_dir=tmp_path / "allow", permissions={"*": ("*:*",)})
    stream = unique("sec")
    with Node(data_dir=tmp_path / "a", name="a", mesh=unique("sc"), mdns=False,
              transports=("tcp",), interface="127.0.0.1", security=cfg) as nd, \
            Publisher(nd, stream) as pub:
        pub.publish_many(range(20))
        with Subscriber(nd, stream, durable="s") as sub:
            assert [e.data for e in drain(sub, 20)] == list(range(20))  # replay to self
            pub.publish(20)
            ev = sub.recv(timeout=5)  # live over the node's own CURVE data socket
            assert ev is not None and ev.data == 20


def test_cursor_rows_of_a_publisher_never_seen_again_age_across_restarts(node: Node) -> None:
    ghost = "ab" * 16  # a publisher that left before this run and never comes back
    stream = unique("ghost")
    with StateStore(node.data_dir / "pubsub-cursors.db") as st:
        st.put("pubsub.cursor.g", f"{ghost}/{stream}", 42)
    with Subscriber(node, stream, durable="g", forget_cursors_after_s=3600) as sub:
        assert sub.positions() == {(ghost, stream): 42}
    with StateStore(node.data_dir / "pubsub-cursors.db") as st:
        since = st.get("pubsub.gone.g", ghost)
        assert isinstance(since, int)  # its clock started at the first run, and is kept
        st.put("pubsub.gone.g", ghost, since - 2 * 3600 * 10**9)  # as if two hours passed
    with Subscriber(node, stream, durable="g", forget_cursors_after_s=3600) as sub:
        wait_until(lambda: sub.recv(timeout=0.05) is None and not sub.positions(), 5,
                   what="orphaned cursor rows dropped")
    with StateStore(node.data_dir / "pubsub-cursors.db") as st:
        assert list(st.items("pubsub.cursor.g")) == []
