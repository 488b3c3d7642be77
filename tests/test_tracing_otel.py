"""OpenTelemetry spans when the ``otel`` extra is installed (skipped otherwise)."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from mesh import Event
from mesh.tracing import OTEL, consuming, span


def test_consume_and_publish_spans_join_the_event_trace() -> None:
    assert OTEL
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    ev = Event(type="t", source="s", stream="orders",
               traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    with consuming(ev), span("publish", "invoices"):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    consume, publish = spans["consume orders"], spans["publish invoices"]
    assert consume.context.trace_id == 0x4bf92f3577b34da6a3ce929d0e0e4736
    assert consume.parent is not None and consume.parent.span_id == 0x00f067aa0ba902b7
    assert publish.parent is not None and publish.parent.span_id == consume.context.span_id
    assert consume.attributes["messaging.message.id"] == ev.id
