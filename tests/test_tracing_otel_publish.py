"""Publisher.publish/publish_many open a ``publish <stream>`` span when an OpenTelemetry SDK
provider is installed (skipped without the SDK)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from mesh import Node
from mesh.tracing import parse_traceparent
from patterns.pubsub import AsyncSubscriber, Publisher, Start, Subscriber
from tests.util import unique


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK provider for this test only: the API sets its global provider once per process,
    so its private slot is swapped and restored (other tests install their own)."""
    from opentelemetry.util._once import Once

    saved = (trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE)
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    try:
        yield exp
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved


def test_publish_and_publish_many_open_one_span_each(
        node_pair: tuple[Node, Node], exporter: InMemorySpanExporter) -> None:
    a, b = node_pair
    stream = unique("otel")
    with Publisher(a, stream) as pub, \
            Subscriber(b, stream, start=Start.beginning()) as sub:
        pub.publish({"one": 1})
        pub.publish_many([1, 2, 3])
        got = [sub.recv(timeout=10) for _ in range(4)]
    spans = [s for s in exporter.get_finished_spans() if s.name == f"publish {stream}"]
    assert len(spans) == 2  # one per call, none nested for the inner call
    assert all(s.attributes is not None
               and s.attributes["messaging.destination.name"] == stream for s in spans)
    first = got[0]
    assert first is not None
    tp = parse_traceparent(first.traceparent)
    assert tp is not None
    # the event names the publish span as its parent
    assert (int(tp[0], 16), int(tp[1], 16)) == (spans[0].context.trace_id,
                                                 spans[0].context.span_id)


def test_explicit_traceparent_wins_inside_the_span(
        node_pair: tuple[Node, Node], exporter: InMemorySpanExporter) -> None:
    a, b = node_pair
    stream = unique("otel")
    root_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with Publisher(a, stream) as pub, \
            Subscriber(b, stream, start=Start.beginning()) as sub:
        pub.publish(b"x", traceparent=root_tp)
        ev = sub.recv(timeout=10)
    assert ev is not None and ev.traceparent == root_tp
    assert [s for s in exporter.get_finished_spans() if s.name == f"publish {stream}"]


def test_otel_active_only_with_a_real_provider() -> None:
    """Without a provider the API hands out no-op spans (10-12 µs each on the request path):
    otel_active() is False then and every span is skipped; an SDK provider turns it on."""
    from opentelemetry.util._once import Once

    from mesh import tracing

    saved = (trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE)
    try:
        trace._TRACER_PROVIDER = None  # the API's state before anyone installs a provider
        assert tracing.otel_active() is False
        with tracing.consuming(ctx=tracing.context_of_request("r1", {}, "svc"), kind="serve") \
                as ctx:
            assert ctx.parent_span_id is None  # our own context, no OTel span adopted
        provider = TracerProvider()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace.set_tracer_provider(provider)
        assert tracing.otel_active() is True
        with tracing.consuming(ctx=tracing.context_of_request("r2", {}, "svc"), kind="serve") \
                as ctx:
            span = trace.get_current_span()
            assert span.is_recording()
            assert ctx.span_id == f"{span.get_span_context().span_id:016x}"
        provider.shutdown()
    finally:
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved


def test_publish_in_an_async_for_body_continues_the_consumed_trace(
        node_pair: tuple[Node, Node], exporter: InMemorySpanExporter) -> None:
    """With an SDK provider installed, an event published in an ``async for`` body (no OTel
    span is current there, only the consumed event's context) is in the consumed event's
    trace, and so is its publish span. The old code started a new trace for the span and
    sent that traceparent (the explicit one wins), cutting the chain."""
    a, b = node_pair
    src, dst = unique("src"), unique("dst")
    root = "4bf92f3577b34da6a3ce929d0e0e4736"
    with Publisher(a, src) as pub_src, Publisher(b, dst) as pub_dst, \
            Subscriber(a, dst, start=Start.beginning()) as sub_dst:
        pub_src.publish({"n": 1}, traceparent=f"00-{root}-00f067aa0ba902b7-01")

        async def main() -> None:
            async with AsyncSubscriber(b, src, start=Start.beginning()) as sub:
                async for ev in sub:
                    pub_dst.publish({"from": ev.data["n"]})  # no trace arguments
                    break

        asyncio.run(asyncio.wait_for(main(), 20))
        derived = sub_dst.recv(timeout=10)
    assert derived is not None
    tp = parse_traceparent(derived.traceparent)
    assert tp is not None and tp[0] == root, derived.traceparent
    spans = [sp for sp in exporter.get_finished_spans() if sp.name == f"publish {dst}"]
    assert len(spans) == 1 and f"{spans[0].context.trace_id:032x}" == root
