"""publish() at full speed goes out in full DATA messages (real nodes, real sockets)."""

from __future__ import annotations

import pytest

from mesh.envelope import Event, encode
from mesh.node import Node
from patterns.pubsub import publisher
from patterns.pubsub.publisher import DATA_MESSAGE_BYTES, FRAME_COST, Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import go_live, unique, wait_until


def _collect(sub: Subscriber, n: int) -> list[Event]:
    got: list[Event] = []
    wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= n, 20,
               what=lambda: f"{len(got)} of {n} events")
    return got


def _full_messages(sizes: list[int]) -> int:
    """How many DATA messages the envelopes take when every message is filled up."""
    msgs, room = 0, 0
    for size in sizes:
        if size + FRAME_COST > room:
            msgs, room = msgs + 1, DATA_MESSAGE_BYTES
        room -= size + FRAME_COST
    return msgs


@pytest.fixture
def no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish() as without a tracer provider, whatever an earlier test installed: a span per
    call makes the calls slower than the 100 µs that starts a held batch."""
    monkeypatch.setattr(publisher, "_OTEL_SLOT", False, raising=False)
    monkeypatch.setattr(publisher, "otel_active", lambda: False)
    monkeypatch.setattr(publisher, "_otel_publish_span", lambda: False)


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.usefixtures("no_spans")
def test_held_batches_fill_whole_data_messages(pair: tuple[Node, Node], durable: bool) -> None:
    # A held batch closes when the next event would not fit in its DATA message (counted as
    # send_data counts: envelopes plus FRAME_COST each), not at a fixed event count: 100 B
    # events go out about 100 to a message (64 before: half again as many messages, and as
    # many wake-ups of the subscriber). linger_s=1 keeps the linger bound out of this count,
    # heartbeat_s=30 the beats (a beat sends what is held).
    a, b = pair
    stream = unique("full")
    with Publisher(a, stream, durable=durable, linger_s=1.0, heartbeat_s=30) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        go_live(pub, sub, b"w", type="w")
        n = 3000
        payloads = [i.to_bytes(4, "big") + b"x" * 96 for i in range(n)]
        before = pub.stats().messages
        for p in payloads:
            pub.publish(p, type="m")
        got = _collect(sub, n)
        assert [e.data for e in got] == payloads  # all, once, in order
        sent = pub.stats().messages - before
        # The envelopes as sent (the canonical encoding of each event: a trace context an
        # installed tracer provider adds is in them too).
        sizes = [len(encode(e)) for e in got]
        full = _full_messages(sizes)
        assert full < n // 64  # the sizes this test is about: more than 64 to a message
        # The first call may go out alone (nothing held yet) and a preempted loop may start
        # one more batch; every other message is full.
        assert sent <= full + 3, (sent, full)
        st = sub.stats()
        assert st.gaps == 0 and st.skipped == 0


@pytest.mark.usefixtures("no_spans")
def test_a_held_batch_never_holds_more_than_one_message(pair: tuple[Node, Node]) -> None:
    # Large events: the held batch is sent as soon as the next one would not fit, so what a
    # publisher holds unsent is at most one DATA message, whatever the event size.
    a, b = pair
    stream = unique("big")
    with Publisher(a, stream, durable=False, linger_s=1.0) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        go_live(pub, sub, b"w", type="w")
        n = 200
        payloads = [i.to_bytes(4, "big") + b"y" * 12_000 for i in range(n)]
        held = 0
        for p in payloads:
            pub.publish(p, type="m")
            st = pub._st
            held = max(held, sum(map(len, st.pending)) + FRAME_COST * len(st.pending))
        assert held <= DATA_MESSAGE_BYTES
        assert [e.data for e in _collect(sub, n)] == payloads
