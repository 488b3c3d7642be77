"""Pub/sub memory is bounded in bytes: a stuck subscriber and its publisher stay small.

libzmq bounds its queues in messages (SNDHWM/RCVHWM); a DATA message used to carry up to
1,000 events, so 10,000 queued messages meant gigabytes. Here: the messages are cut at a byte
budget, the data sockets' HWMs follow from it, and a subscriber that was stuck catches up by
replay from the log, complete and in order.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import zmq

from mesh.node import Node
from patterns.pubsub import frames, publisher, subscriber
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.raw_pubsub import raw_subscriber
from tests.util import REPO, unique, wait_until


def _budget() -> tuple[int, int, int]:
    """(DATA_HWM, DATA_MESSAGE_BYTES, FRAME_COST) of the publisher."""
    return publisher.DATA_HWM, publisher.DATA_MESSAGE_BYTES, publisher.FRAME_COST


def _bench() -> ModuleType:
    path = os.path.join(REPO, "bench", "bench_pubsub_memory.py")
    spec = importlib.util.spec_from_file_location("bench_pubsub_memory", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw_subscriber(zctx: zmq.Context[zmq.Socket[bytes]], pub: Publisher,
                    stream: str) -> zmq.Socket[bytes]:
    return raw_subscriber(zctx, next(e for e in pub.endpoints if e.startswith("tcp")), stream)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    nd = Node(data_dir=tmp_path / "n", name="n", mesh=unique("mem"), mdns=False,
              interface="127.0.0.1")
    yield nd
    nd.close()


def test_the_hwm_times_the_message_cap_is_the_byte_budget() -> None:
    DATA_HWM, DATA_MESSAGE_BYTES, _ = _budget()
    assert DATA_HWM * DATA_MESSAGE_BYTES == publisher.QUEUE_BYTES == 32 << 20
    assert subscriber._DATA_HWM == DATA_HWM  # one budget on both sides


def test_a_big_batch_goes_out_in_messages_under_the_byte_cap(
        node: Node, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    DATA_HWM, DATA_MESSAGE_BYTES, FRAME_COST = _budget()
    stream = unique("cut")
    with Publisher(node, stream, durable=False) as pub:
        assert pub._hub.sock.getsockopt(zmq.SNDHWM) == DATA_HWM
        sub = _raw_subscriber(zctx, pub, stream)
        try:
            # Connected once a probe got through (slow joiner), then one 3,000-event call.
            wait_until(lambda: (pub.publish(-1), sub.poll(50))[1], 5, what="connected")
            while sub.poll(100):
                sub.recv_multipart()
            first = pub.head
            pub.publish_many([b"x" * 100] * 3000)
            seqs: list[int] = []
            sizes: list[int] = []
            while len(seqs) < 3000 and sub.poll(2000):
                msg = sub.recv_multipart()
                _, head, envs = frames.decode_message(msg, max_event_size=1 << 20)
                assert head.seq == first + len(seqs)  # contiguous, in order
                seqs.extend(range(head.seq, head.seq + head.count))
                sizes.append(sum(len(e) + FRAME_COST for e in envs))
        finally:
            sub.close(linger=0)
    assert seqs == list(range(first, first + 3000))
    assert len(sizes) > 3  # more than one message per 1,000-event log batch
    assert max(sizes) <= DATA_MESSAGE_BYTES


def test_one_event_larger_than_the_cap_is_still_sent(
        node: Node, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    _, DATA_MESSAGE_BYTES, _ = _budget()
    stream = unique("big")
    with Publisher(node, stream, durable=False) as pub:
        sub = _raw_subscriber(zctx, pub, stream)
        try:
            wait_until(lambda: (pub.publish(-1), sub.poll(50))[1], 5, what="connected")
            while sub.poll(100):
                sub.recv_multipart()
            first = pub.head
            pub.publish_many([b"a" * 10, b"b" * (DATA_MESSAGE_BYTES * 2), b"c" * 10])
            counts = []
            while sum(counts) < 3 and sub.poll(2000):
                _, head, _envs = frames.decode_message(sub.recv_multipart(), max_event_size=1 << 20)
                assert head.seq == first + sum(counts)
                counts.append(head.count)
        finally:
            sub.close(linger=0)
    assert counts == [1, 1, 1]


def test_the_subscriber_socket_defaults_to_the_byte_budget(node: Node) -> None:
    DATA_HWM, _, _ = _budget()
    with Subscriber(node, unique("s"), start=Start.new()) as sub:
        assert sub._sock.getsockopt(zmq.RCVHWM) == DATA_HWM
    with Subscriber(node, unique("s"), start=Start.new(), rcvhwm=7) as sub:
        assert sub._sock.getsockopt(zmq.RCVHWM) == 7


def test_stuck_subscriber_and_its_publisher_stay_small_then_it_replays_everything() -> None:
    # Two real processes: 250,000 events of 300 B (about 100 MiB in libzmq's queues, more than
    # both budgets hold) published in publish_many(1000) calls while the subscriber's handler
    # is blocked. Before the byte budget the subscriber grew by over 200 MiB here (it held every
    # event; 1 GiB at 1 M events of 100 B).
    r = _bench().run(250_000, "batch", size=300, timeout=60)
    grown_sub = r["sub_mib"] - r["base_sub_mib"]
    grown_pub = r["pub_mib"] - r["base_pub_mib"]
    assert grown_sub < 64, r
    assert grown_pub < 64, r
    assert r["sub_mib"] < 100 and r["pub_mib"] < 100, r
    # Released, it receives all of them once each, in order (most of them by replay).
    assert r["complete"], r
    assert r["replayed"] > 10_000, r  # what the queues dropped came from the log


def test_one_pump_decodes_a_bounded_number_of_events(node_pair: tuple[Node, Node]) -> None:
    # The ready queue only fills when the consumer asks, but one ask used to decode up to
    # 1,000 queued messages of 1,000 events (a million Event objects): now about 256 KiB.
    a, b = node_pair
    stream = unique("pump")
    with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
        wait_until(lambda: sub.recv(timeout=0.05) is not None or (pub.publish(-1), False)[1],
                   10, what="connected")
        while sub.recv(timeout=0.2) is not None:
            pass
        pub.publish_many([b"x" * 100] * 50_000)
        most, got = 0, 0
        while got < 50_000:
            ev = sub.recv(timeout=10)
            assert ev is not None, f"stalled after {got}"
            got += 1
            most = max(most, len(sub._ready))
    assert most < 5_000, most  # a pump (about 1,300 events) or a replay chunk (2,000)
