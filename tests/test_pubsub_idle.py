"""Many idle streams cost little: heartbeats back off while a head does not move, and the
publisher forgets the positions of subscribers that left (real sockets, real nodes)."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from patterns.pubsub import frames
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.raw_pubsub import raw_subscriber
from tests.util import ctrl, make_node, unique, wait_until


def test_an_idle_stream_beats_less_and_a_moved_head_is_announced_at_once(
        tmp_path: Path) -> None:
    ctx = zmq.Context.instance()
    with make_node(tmp_path / "p", unique("idle")) as nd, \
            Publisher(nd, "idle.s", heartbeat_s=0.05) as pub:
        sub = raw_subscriber(ctx, pub.endpoints[0], "idle.s")
        try:
            pub.publish(b"x")

            def beats(seconds: float) -> list[int]:
                heads = []
                end = time.monotonic() + seconds
                while (left := end - time.monotonic()) > 0:
                    if sub.poll(int(left * 1000) + 1):
                        _, h, _ = frames.decode_message(sub.recv_multipart(),
                                                        max_event_size=1 << 20)
                        if h.kind == frames.KIND_HEARTBEAT:
                            heads.append(h.seq)
                return heads

            wait_until(lambda: beats(0.2), timeout=5, what="the first heartbeat")
            # Idle for 2 s at heartbeat_s=0.05: 40 beats without backoff; doubling intervals
            # (0.05, 0.1, ... capped at 1 s) make it a handful.
            idle = beats(2.0)
            assert 1 <= len(idle) <= 10, idle
            pub.publish(b"y")                 # the head moved: the next beat says so at once
            t0 = time.monotonic()
            got = wait_until(lambda: 2 in beats(0.05), timeout=2, what="the new head")
            assert got and time.monotonic() - t0 < 1.0
        finally:
            sub.close(0)


def test_positions_of_a_subscriber_node_that_left_are_forgotten(tmp_path: Path) -> None:
    mesh = unique("idle")
    with make_node(tmp_path / "p", mesh) as nd, \
            Publisher(nd, "fg.s", heartbeat_s=0.05, forget_after_s=0.3) as pub:
        pub.publish_many([1, 2, 3])
        with make_node(tmp_path / "s", mesh, (ctrl(nd),)) as ns, Subscriber(
                ns, "fg.s", durable="agg", start=Start.beginning()) as sub:
            for _ in range(3):
                assert sub.recv(timeout=10) is not None
            sub.commit()
            wait_until(lambda: pub.stats().positions.get("agg") == 3, timeout=10,
                       what="the ack")
        # The subscriber node said BYE: after forget_after_s its row goes.
        wait_until(lambda: "agg" not in pub.stats().positions, timeout=10,
                   what="the position forgotten")


def test_a_burst_of_offers_is_one_update_not_one_per_offer(tmp_path: Path) -> None:
    # 3,000 streams offered in a loop: each offer used to encode and send the whole (growing)
    # node info to every peer (O(n^2) bytes and CPU); a burst now costs a few UPDATEs.
    mesh = unique("idle")
    with make_node(tmp_path / "a", mesh) as a, make_node(tmp_path / "b", mesh, (ctrl(a),)) as b:
        wait_until(lambda: a.peers.list() and b.peers.list(), timeout=10, what="joined")
        before = a.stats()["control_bytes_out"]
        for i in range(3000):
            a.offer("stream", f"burst.{i}")
        wait_until(lambda: any(len(p.offers.get("stream", ())) == 3000
                               for p in b.peers.list()), timeout=10, what="offers seen")
        # The final info is about 32 KB; one UPDATE per offer was 2.7 MB here.
        sent = a.stats()["control_bytes_out"] - before
        assert sent < 300_000, sent
