"""Coalescing of consecutive publish() calls into one DATA message (real nodes and sockets)."""

from __future__ import annotations

import pytest

from mesh.errors import ConfigError
from mesh.node import Node
from patterns.pubsub.publisher import COALESCE_MAX, Publisher
from patterns.pubsub.subscriber import Start, Subscriber
from tests.util import go_live, unique, wait_until


def collect(sub: Subscriber, n: int, timeout: float = 10) -> list[int]:
    got: list[int] = []
    wait_until(lambda: got.extend(e.data for e in sub.recv_batch(timeout=0.05))
               or len(got) >= n, timeout, what=f"{n} events")
    return got


@pytest.mark.parametrize("durable", [True, False])
def test_fast_publishes_coalesce_into_fewer_messages_in_order(
        pair: tuple[Node, Node], durable: bool) -> None:
    a, b = pair
    stream = unique("co")
    with Publisher(a, stream, durable=durable) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        go_live(pub, sub, -1)
        before = pub.stats().messages
        for i in range(5000):
            pub.publish(i)
        assert collect(sub, 5000) == list(range(5000))
        sent = pub.stats().messages - before
        # A tight loop publishes well within 100 µs per call: most calls were held and joined.
        assert 5000 // COALESCE_MAX <= sent < 5000 // 2
        assert sub.stats().gaps == 0  # heartbeats never ran ahead of held events


def test_held_event_goes_out_after_linger_without_more_publishes(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("co")
    with Publisher(a, stream, linger_s=0.01, heartbeat_s=30) as pub, Subscriber(
            b, stream, start=Start.new()) as sub:
        go_live(pub, sub, -1)
        pub.publish(1)
        pub.publish(2)  # right after a send: held, and nothing follows it
        assert collect(sub, 2, timeout=5) == [1, 2]
        assert pub.stats().messages >= 2


def test_publish_many_and_close_send_held_events_first(pair: tuple[Node, Node]) -> None:
    a, b = pair
    stream = unique("co")
    # Best-effort: an event overtaken on the wire would be skipped, not replayed.
    with Subscriber(b, stream, start=Start.new()) as sub:
        with Publisher(a, stream, durable=False, linger_s=1.0, heartbeat_s=30) as pub:
            go_live(pub, sub, -1)
            pub.publish(0)
            pub.publish(1)  # held for up to 1 s
            pub.publish_many([2, 3])  # must not overtake it
            pub.publish(4)
            pub.publish(5)  # held; close() sends it
        assert collect(sub, 6) == [0, 1, 2, 3, 4, 5]
        st = sub.stats()
        assert st.skipped == 0 and st.gaps == 0


def test_bad_linger_is_refused(pair: tuple[Node, Node]) -> None:
    with pytest.raises(ConfigError):
        Publisher(pair[0], unique("co"), linger_s=-1)


def test_threads_sharing_one_publisher_get_distinct_seqs_ids_and_bytes(
        pair: tuple[Node, Node]) -> None:
    # Four threads on one durable publisher: three make plain calls (the publisher's own
    # encoder, one packer), one sets a subject (the general path) in between. Every event
    # arrives once, whole, with its own seq and id, ids in seq order (both are taken under
    # the hub's lock), and the log holds the same envelopes at the same offsets.
    import threading

    from mesh.envelope import Event, decode
    a, b = pair
    stream = unique("th")
    n = 2000
    with Publisher(a, stream) as pub, Subscriber(b, stream, start=Start.beginning()) as sub:
        def work(t: int) -> None:
            for i in range(n):
                if t == 3:
                    pub.publish([t, i], type="general", subject="s")
                else:
                    pub.publish([t, i], type="plain")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        got: list[Event] = []
        wait_until(lambda: got.extend(sub.recv_batch(timeout=0.05)) or len(got) >= 4 * n, 30,
                   what=lambda: len(got))
        assert [e.seq for e in got] == list(range(4 * n))
        assert sorted(tuple(e.data) for e in got) == sorted((t, i) for t in range(4)
                                                            for i in range(n))
        assert all((e.type == "general") == (e.data[0] == 3) for e in got)
        ids = [e.id for e in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        log = pub._log
        assert log is not None
        recs = log.read(0, 4 * n)
        assert [decode(r.payload).id for r in recs] == ids
