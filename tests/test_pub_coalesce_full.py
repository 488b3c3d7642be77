"""publish() at full speed goes out in full DATA messages (real nodes, real sockets)."""

from __future__ import annotations

import math

import pytest

from mesh.envelope import NewEventEncoder
from mesh.node import Node
from patterns.pubsub.publisher import DATA_MESSAGE_BYTES, FRAME_COST, Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import unique, wait_until


def _collect(sub: Subscriber, n: int) -> list[bytes]:
    got: list[bytes] = []
    wait_until(lambda: got.extend(e.data for e in sub.recv_batch(timeout=0.05))
               or len(got) >= n, 20, what=lambda: f"{len(got)} of {n} events")
    return got


@pytest.mark.parametrize("durable", [False, True])
def test_held_batches_fill_whole_data_messages(pair: tuple[Node, Node], durable: bool) -> None:
    # A held batch closes when the next event would not fit in its DATA message (counted as
    # send_data counts: envelopes plus FRAME_COST each), not at a fixed event count: 100 B
    # events go out about 100 to a message (64 before: half again as many messages, and as
    # many wake-ups of the subscriber). linger_s=1 keeps the linger bound out of this count.
    a, b = pair
    stream = unique("full")
    with Publisher(a, stream, durable=durable, linger_s=1.0) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        wait_until(lambda: (pub.publish(b"w", type="w"), sub.recv(timeout=0.05))[1]
                   is not None, 5, what="subscribed")
        while sub.recv(timeout=0.2) is not None:
            pass
        n = 3000
        payloads = [i.to_bytes(4, "big") + b"x" * 96 for i in range(n)]
        env = len(NewEventEncoder(pub.source, stream).encode(pub.head + n, "m", payloads[0]))
        fit = DATA_MESSAGE_BYTES // (env + FRAME_COST)
        assert fit > 64  # the size this test is about
        before = pub.stats().messages
        for p in payloads:
            pub.publish(p, type="m")
        assert _collect(sub, n) == payloads  # all, once, in order
        sent = pub.stats().messages - before
        # The first call may go out alone (nothing held yet) and a preempted loop may start
        # one more batch; every other message is full.
        assert sent <= math.ceil(n / fit) + 3, (sent, fit)
        st = sub.stats()
        assert st.gaps == 0 and st.skipped == 0


def test_a_held_batch_never_holds_more_than_one_message(pair: tuple[Node, Node]) -> None:
    # Large events: the held batch is sent as soon as the next one would not fit, so what a
    # publisher holds unsent is at most one DATA message, whatever the event size.
    a, b = pair
    stream = unique("big")
    with Publisher(a, stream, durable=False, linger_s=1.0) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        wait_until(lambda: (pub.publish(b"w", type="w"), sub.recv(timeout=0.05))[1]
                   is not None, 5, what="subscribed")
        while sub.recv(timeout=0.2) is not None:
            pass
        n = 200
        payloads = [i.to_bytes(4, "big") + b"y" * 12_000 for i in range(n)]
        held = 0
        for p in payloads:
            pub.publish(p, type="m")
            st = pub._st
            held = max(held, sum(map(len, st.pending)) + FRAME_COST * len(st.pending))
        assert held <= DATA_MESSAGE_BYTES
        assert _collect(sub, n) == payloads
