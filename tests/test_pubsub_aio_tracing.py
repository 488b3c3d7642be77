"""AsyncSubscriber sets the trace context per delivered event, as the sync iterator does."""

from __future__ import annotations

import asyncio

from mesh import Event, Node
from mesh.tracing import parse_traceparent
from patterns.pubsub import AsyncSubscriber, Publisher, Start, Subscriber
from tests.util import unique


def test_event_published_in_async_for_body_inherits_trace_context(
        node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    src, dst = unique("src"), unique("dst")
    root_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    with Publisher(a, src) as pub_src, Publisher(b, dst) as pub_dst, \
            Subscriber(a, dst, start=Start.beginning()) as sub_dst:
        pub_src.publish({"n": 1}, correlationid="conv-a", traceparent=root_tp)
        pub_src.publish({"n": 2}, correlationid="conv-b")

        async def main() -> list[str]:
            ids: list[str] = []
            async with AsyncSubscriber(b, src, start=Start.beginning(), batch=10) as sub:
                async for ev in sub:
                    ids.append(ev.id)
                    pub_dst.publish({"from": ev.data["n"]})  # no trace arguments
                    if len(ids) == 2:
                        break
            return ids

        consumed = asyncio.run(asyncio.wait_for(main(), 20))
        derived: list[Event] = []
        while len(derived) < 2:
            ev = sub_dst.recv(timeout=10)
            assert ev is not None
            derived.append(ev)
    first, second = sorted(derived, key=lambda e: e.data["from"])
    assert first.correlationid == "conv-a" and first.causationid == consumed[0]
    tp = parse_traceparent(first.traceparent)
    assert tp is not None and tp[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
    # the second event's own context replaced the first one's (one per delivered event)
    assert second.correlationid == "conv-b" and second.causationid == consumed[1]
    tp2 = parse_traceparent(second.traceparent)
    assert tp2 is not None and tp2[0] != tp[0]
