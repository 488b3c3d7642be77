"""Pub/sub on real nodes and sockets in one process: gaps, replay, start positions, bad input."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import zmq

from mesh.envelope import Event, encode
from mesh.log import LogConfig, Retention
from mesh.node import Node
from patterns.pubsub import frames
from patterns.pubsub.dedup import Dedup
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import RetentionGap, Start, Subscriber
from tests.util import ctrl, drain, go_live, make_node, unique, wait_until


def test_slow_subscriber_tiny_hwm_drops_on_wire_then_replays_all(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("slow")
    # linger_s=0: one message per event, so the tiny HWMs really drop messages on the wire.
    with Publisher(a, stream, sndhwm=5, linger_s=0) as pub, Subscriber(
            b, stream, start=Start.new(), rcvhwm=5, max_buffer=100) as sub:
        wait_until(lambda: b.id in {p.node_id for p in a.peers.list()}, 5)
        # Connected once one event got through (the slow joiner may miss the first ones).
        go_live(pub, sub, -1)
        before = sub.stats().delivered
        # The subscriber does not read while 20,000 events go out one message each.
        for i in range(20_000):
            pub.publish(i)
        got = drain(sub, 20_000)
        assert [e.data for e in got] == list(range(20_000))
        st = sub.stats()
        assert st.gaps > 0 and st.replayed > 0  # holes were seen on the wire...
        assert st.messages < 20_000  # ...because messages were dropped at the HWMs
        assert st.delivered == before + 20_000


def test_late_joiner_from_beginning_of_100k_then_live(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("late")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(100_000))
        with Subscriber(b, stream, start=Start.beginning()) as sub:
            got = drain(sub, 100_000, timeout=40)
            assert [e.seq for e in got] == list(range(100_000))
            assert [e.data for e in got[:3]] == [0, 1, 2]
            pub.publish("live")
            ev = sub.recv(timeout=5)
            assert ev is not None and (ev.seq, ev.data) == (100_000, "live")
            assert sub.stats().duplicates == 0 or sub.recv(timeout=0.2) is None


def test_start_offset_time_and_new(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("pos")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        t = time.time_ns()
        wait_until(lambda: time.time_ns() > t + 1000, 1)
        pub.publish_many(range(10, 20))
        with Subscriber(b, stream, start=Start.offset(15)) as s1:
            assert [e.data for e in drain(s1, 5)] == [15, 16, 17, 18, 19]
        with Subscriber(b, stream, start=Start.time(t)) as s2:
            assert [e.data for e in drain(s2, 10)] == list(range(10, 20))
        with Subscriber(b, stream, start=Start.new()) as s3:
            wait_until(lambda: s3.stats().heartbeats > 0 or s3.recv(timeout=0.05) is not None,
                       5, what="heartbeat")
            pub.publish(99)
            ev = s3.recv(timeout=5)
            assert ev is not None and ev.data == 99


def test_durable_subscription_resumes_and_publisher_sees_lag(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("dur")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(100))
        with Subscriber(b, stream, durable="agg", auto_commit=False) as s1:
            got = drain(s1, 40)[:40]
            assert [e.data for e in got] == list(range(40))
        with Subscriber(b, stream, durable="agg", auto_commit=False) as s1:
            ev = s1.recv(timeout=5)
            assert ev is not None and ev.data == 0  # nothing committed: starts over
            for _ in range(29):
                s1.recv(timeout=5)
            s1.commit()  # the 30 handed out (0..29) are done
        wait_until(lambda: pub.stats().positions.get("agg") == 30, 5, what="ack")
        assert pub.stats().lag["agg"] == 70
        with Subscriber(b, stream, durable="agg") as s2:
            assert [e.data for e in drain(s2, 70)] == list(range(30, 100))


def test_two_publishers_one_prefix(tmp_path: Path) -> None:
    mesh = unique("ps")
    with make_node(tmp_path / "p1", mesh) as p1, make_node(tmp_path / "p2", mesh) as p2, \
            make_node(tmp_path / "s", mesh, (ctrl(p1), ctrl(p2))) as s, \
            Publisher(p1, "m.a") as pa, Publisher(p2, "m.b") as pb:
        pa.publish_many(range(50))
        pb.publish_many(range(100, 150))
        wait_until(lambda: len(s.who_offers("stream", prefix="m.")) == 2, 5)
        with Subscriber(s, "m.", start=Start.beginning()) as sub:
            got = drain(sub, 100)
            assert [e.data for e in got if e.stream == "m.a"] == list(range(50))
            assert [e.data for e in got if e.stream == "m.b"] == list(range(100, 150))


def test_best_effort_stream_delivers_live(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("be")
    with Publisher(a, stream, durable=False) as pub, Subscriber(b, stream) as sub:
        wait_until(lambda: (pub.publish("x"), sub.recv(timeout=0.05))[1] is not None, 5)
        pub.publish_many(range(100))
        got: list[object] = []
        while 99 not in got:
            ev = sub.recv(timeout=5)
            assert ev is not None
            if ev.data != "x":
                got.append(ev.data)
        assert got == list(range(100))
        assert not (a.data_dir / "streams" / stream).exists()


def test_retention_gone_skips_or_raises(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("ret")
    cfg = LogConfig(segment_bytes=4096, retention=Retention(max_records=200))
    with Publisher(a, stream, log_config=cfg) as pub:
        for _ in range(500):
            pub.publish(b"x" * 100)
        pub._log.enforce_retention()  # type: ignore[union-attr]
        oldest = pub.stats().oldest
        assert oldest > 0
        with Subscriber(b, stream, start=Start.offset(0)) as s1:
            got = drain(s1, 500 - oldest)
            assert got[0].seq == oldest and s1.stats().skipped == oldest
        with Subscriber(b, stream, start=Start.offset(0), on_retention="error") as s2:
            with pytest.raises(RetentionGap) as info:
                drain(s2, 1)
            assert (info.value.start, info.value.end) == (0, oldest)
            ev = s2.recv(timeout=5)
            assert ev is not None and ev.seq == oldest


def test_garbage_to_subscriber_and_replay_endpoint_is_counted_and_ignored(
        pair: tuple[Node, Node], zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    a, b = pair
    stream = unique("bad")
    raw = zctx.socket(zmq.ROUTER)  # a static "publisher" speaking pub/sub protocol 2
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Publisher(a, stream) as pub, Subscriber(
                b, stream, start=Start.beginning(), endpoints=[f"tcp://127.0.0.1:{port}"],
                max_event_size=10_000) as sub:
            pub.publish("before")
            ev = sub.recv(timeout=5)
            assert ev is not None and ev.data == "before"
            fake = bytes(16)
            topic = stream.encode()
            bad_msgs = [
                [topic, b"\x01garbage"],
                [topic],
                [topic, frames.HEADER.pack(9, 1, 0, fake, 0, 0, 1), b"x"],
                frames.encode_data(topic, fake, 0, 0, [b"y" * 20_000], True),
                frames.encode_data(topic, fake, 5, 0, [b"\xc1not msgpack"], False),
            ]
            assert raw.poll(5000), "no subscription request"
            rid = raw.recv_multipart()[0]  # the subscriber's connection
            wait_until(lambda: (
                [raw.send_multipart([rid, *m]) for m in bad_msgs],
                sub.recv(timeout=0.05),
                sub.stats().bad_frames >= 2 and sub.stats().bad_version >= 1
                and sub.stats().oversize >= 1 and sub.stats().bad_events >= 1)[2], 5,
                what="garbage counted")
            # Garbage on the control channel: to the replay endpoint and to the subscriber.
            for body in (None, 7, b"\x00" * 100, {"v": 2}, {"v": 1, "sid": "x"},
                         {"v": 1, "sid": "x", "req": 1, "stream": stream, "from": 0,
                          "max": -1, "max_bytes": 1}):
                b.send(a.id, frames.CTRL_REPLAY, body)
                a.send(b.id, frames.CTRL_REPLAY_DATA, body)
            a.send(b.id, frames.CTRL_REPLAY_DATA, {"v": 1, "sid": sub.sid, "events": [1]})
            b.send(a.id, frames.CTRL_ACK, {"v": 1, "name": 5})
            wait_until(lambda: pub.stats().bad_requests >= 7, 5, what="bad requests counted")
            wait_until(lambda: sub.stats().bad_replies >= 1, 5)
            pub.publish("after")
            for i in range(3):
                pub.publish(i)
            got = [e.data for e in drain(sub, 4, timeout=5)]
            assert got == ["after", 0, 1, 2]
            assert msgpack.unpackb(encode(Event(type="t", source="s", data=1)))[0] == 1
    finally:
        raw.close(linger=0)


def test_dedup_helper_on_redelivery(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("dd")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(10))
        dedup = Dedup(window=100)
        seen = []
        for _ in range(2):  # two non-durable readers from the beginning: everything twice
            with Subscriber(b, stream, start=Start.beginning()) as sub:
                seen += [e for e in drain(sub, 10) if dedup.first_time(e.id)]
        assert [e.data for e in seen] == list(range(10)) and dedup.duplicates == 10


def test_async_subscriber_and_publisher(pair: tuple[Node, Node]) -> None:
    import asyncio

    from patterns.pubsub import AsyncPublisher, AsyncSubscriber

    a, b = pair
    stream = unique("aio")

    async def main() -> list[object]:
        async with AsyncPublisher(a, stream) as pub:
            await pub.publish_many(range(2500))
            got: list[object] = []
            async with AsyncSubscriber(b, stream, durable="a1", batch=100) as sub:
                async for ev in sub:
                    got.append(ev.data)
                    if len(got) == 1000:
                        break
            async with AsyncSubscriber(b, stream, durable="a1") as sub:
                async for ev in sub:
                    got.append(ev.data)
                    if ev.data == 2499:
                        break
            return got

    got = asyncio.run(asyncio.wait_for(main(), 20))
    # Resumed right after the last event handled in the first session: at-least-once with
    # the 1000th (in flight at close) redelivered at most.
    assert got[:1000] == list(range(1000))
    assert got[1000:] in (list(range(1000, 2500)), list(range(999, 2500)))


def test_callback_style_commits_after_handler(pair: tuple[Node, Node]) -> None:
    import threading

    a, b = pair
    stream = unique("cb")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(20))
        seen: list[object] = []
        stop = threading.Event()

        def handler(ev: Event) -> None:
            if ev.data == 10:
                raise RuntimeError("handler failed")
            seen.append(ev.data)

        with Subscriber(b, stream, durable="cb") as sub, pytest.raises(RuntimeError):
            sub.run(handler, stop=stop)
        assert seen == list(range(10))
        with Subscriber(b, stream, durable="cb") as sub:
            ev = sub.recv(timeout=5)
            assert ev is not None and ev.data == 10  # the failed one comes again


def test_auto_commit_runs_while_draining_a_backlog(pair: tuple[Node, Node]) -> None:
    """A durable subscriber catching up commits as it goes, not only when it goes idle: a
    crash in the middle of a long replay must not redo all of it."""
    a, b = pair
    stream = unique("backlog")
    with Publisher(a, stream) as pub:
        pub.publish_many(range(20_000))
        # commit_interval_s=0: every recv() may commit, so the only question is whether the
        # backlog path (events already queued, no wait on the socket) commits at all.
        with Subscriber(b, stream, durable="d", commit_interval_s=0.0,
                        replay_chunk=20_000) as sub:
            committed_mid_backlog = False
            for i in range(20_000):
                queued = bool(sub._ready)
                before = sub.stats().commits
                ev = sub.recv(timeout=10)
                assert ev is not None and ev.data == i
                if queued and i > 1 and sub.stats().commits > before:
                    committed_mid_backlog = True
                    break
            assert committed_mid_backlog
