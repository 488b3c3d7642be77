"""A publisher's own id source (mesh.uuid7.Uuid7Source): ids unique, time-ordered, in seq order
on every publish path, apart from other sources and from a forked child's."""

from __future__ import annotations

import os
import re
import time

import pytest

from mesh.envelope import NewEventEncoder, decode, encode_new, encode_new_many
from mesh.node import Node
from mesh.uuid7 import Uuid7Source, uuid7, uuid7_time
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until

_V7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_increase_through_counter_overflow_and_clock_steps() -> None:
    src = Uuid7Source()
    t = time.time_ns()
    ids = [src.next(t) for _ in range(10_000)]  # one clock reading: the counter overflows
    ids += [src.next(t - 5_000_000_000) for _ in range(100)]  # the clock stepped back 5 s
    ids += [src.next(t + 60_000_000_000) for _ in range(100)]  # and forward a minute
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(_V7.fullmatch(i) for i in ids)
    first = uuid7_time(ids[0]).timestamp()
    assert abs(first - t / 1e9) < 0.002
    # Overflow moves on by a millisecond at a time: a few ms ahead, never back.
    assert 0 <= uuid7_time(ids[9_999]).timestamp() - first < 0.01
    assert abs(uuid7_time(ids[-1]).timestamp() - (t / 1e9 + 60)) < 0.002


def test_batch_continues_the_sources_order() -> None:
    t = time.time_ns()
    src = Uuid7Source()
    first = src.next(t)
    got = src.batch(5_000, t) + src.batch(3, t) + src.batch(0, t)  # 5,000: past one ms's counter
    after = src.next(t)
    seq = [first, *got, after]
    assert len(got) == 5_003 and seq == sorted(seq) and len(set(seq)) == 5_005
    assert all(_V7.fullmatch(i) for i in got)
    assert len({i[:13] for i in got}) >= 2  # the counter ran over into the next millisecond


def test_sources_never_share_ids() -> None:
    t = time.time_ns()
    srcs = [Uuid7Source() for _ in range(8)]
    ids = [s.next(t) for _ in range(500) for s in srcs] + [uuid7(t) for _ in range(500)]
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    src = Uuid7Source()
    t = time.time_ns()
    before = src.next(t)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the next ids for the same clock reading, then exit at once
        try:
            os.write(w, "\n".join(src.next(t) for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    child = b"".join(chunks).decode().split("\n")
    parent = [src.next(t) for _ in range(50)]
    assert len(child) == 50 and not set(child) & set(parent)
    assert min(child) > before and child == sorted(child)


def test_encoder_and_encode_new_paths_share_one_order() -> None:
    enc = NewEventEncoder("node/p", "s.t")
    ids = []
    for i in range(300):  # all within a few milliseconds: order comes from the one source
        ids.append(decode(enc.encode(3 * i, "m", b"x")).id)
        ids.append(decode(encode_new(type="m", source="node/p", stream="s.t", seq=3 * i + 1,
                                     subject="s", ids=enc.ids)).id)
        ids += [decode(b).id for b in encode_new_many([b"a"], type="m", source="node/p",
                                                       stream="s.t", first_seq=3 * i + 2,
                                                       ids=enc.ids)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_publisher_ids_follow_seqs_on_every_path(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("ids")
    with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
        for i in range(200):
            pub.publish(i, type="plain")
            pub.publish(i, type="general", subject="s")
            pub.publish_many([i, i], type="many")
        got: list[str] = []
        seqs: list[int] = []

        def take() -> bool:
            for e in sub.recv_batch(timeout=0.05):
                got.append(e.id)
                seqs.append(e.seq)
            return len(got) >= 800

        wait_until(take, 20, what=lambda: f"{len(got)} of 800 events")
        assert seqs == list(range(800))
        assert got == sorted(got) and len(set(got)) == 800
