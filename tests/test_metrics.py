"""Unit tests of mesh.metrics and mesh.tracing (no sockets except the HTTP endpoint)."""

from __future__ import annotations

import logging
import threading
import urllib.request

import pytest

from mesh import Event
from mesh.errors import ConfigError
from mesh.metrics import Collect, Registry, parse_prometheus, render_prometheus, serve_prometheus
from mesh.tracing import (
    OTEL,
    TraceFilter,
    child_fields,
    consuming,
    current,
    parse_traceparent,
    request_headers,
)


def test_counter_gauge_histogram_render_and_parse_back() -> None:
    reg = Registry()
    c = reg.counter("jobs_total", "Jobs done.", ("kind",))
    c.labels(kind='re"size\\x\n').inc(3)
    c.labels("plain").inc()
    g = reg.gauge("depth", "Queue depth.")
    g.set(7)
    g.dec(2)
    h = reg.histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    text = render_prometheus(reg)
    assert "# TYPE jobs_total counter" in text
    assert "# TYPE lat_seconds histogram" in text
    assert 'jobs_total{kind="re\\"size\\\\x\\n"} 3' in text
    assert 'lat_seconds_bucket{le="0.1"} 2' in text  # le is inclusive
    assert 'lat_seconds_bucket{le="+Inf"} 4' in text
    assert "lat_seconds_count 4" in text
    parsed = parse_prometheus(text)
    assert parsed["depth"] == [({}, 5.0)]
    assert ({"kind": 're"size\\x\n'}, 3.0) in parsed["jobs_total"]
    assert parsed["lat_seconds_sum"][0][1] == pytest.approx(2.65)


def test_collectors_merge_and_a_broken_one_is_counted() -> None:
    reg = Registry()

    def a(out: Collect) -> None:
        out.counter("events_published_total", 5, "Published.", stream="a")

    def b(out: Collect) -> None:
        out.counter("events_published_total", 6, stream="b")

    def broken(out: Collect) -> None:
        raise RuntimeError("boom")

    reg.register_collector(a)
    unreg = reg.register_collector(b)
    reg.register_collector(broken)
    d = reg.as_dict()
    vals = {s["labels"]["stream"]: s["value"] for s in d["events_published_total"]["samples"]}
    assert vals == {"a": 5, "b": 6}
    assert d["metrics_collector_errors_total"]["samples"][0]["value"] == 1
    unreg()
    assert len(reg.as_dict()["events_published_total"]["samples"]) == 1


def test_bad_names_and_misuse_raise_config_error() -> None:
    reg = Registry()
    with pytest.raises(ConfigError):
        reg.counter("bad name", "x")
    c = reg.counter("x_total", "x", ("a",))
    with pytest.raises(ConfigError):
        c.inc()  # has labels
    with pytest.raises(ConfigError):
        c.labels(b=1)
    with pytest.raises(ConfigError):
        reg.gauge("x_total", "x")
    with pytest.raises(ConfigError):
        reg.counter("y_total", "y").inc(-1)
    with pytest.raises(ConfigError):
        parse_prometheus("foo{a=1} 2")


def test_counter_exact_under_thread_race() -> None:
    c = Registry().counter("n_total", "n")
    def work() -> None:
        for _ in range(20_000):
            c.inc()
    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.value == 80_000


def test_serve_prometheus_http() -> None:
    reg = Registry()
    reg.counter("hits_total", "Hits.").inc(2)
    server, port = serve_prometheus(reg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert parse_prometheus(r.read().decode())["hits_total"] == [({}, 2.0)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics.json", timeout=5) as r:
            assert b'"hits_total"' in r.read()
    finally:
        server.close()


def test_trace_context_defaults_from_consumed_event() -> None:
    root = Event(type="t", source="s")
    assert current() is None
    assert child_fields(None, None, None) == (None, None, None)
    with consuming(root) as ctx:
        cid, cause, tp = child_fields(None, None, None)
        assert cid == root.id and cause == root.id
        parsed = parse_traceparent(tp)
        assert parsed is not None and parsed[0] == ctx.trace_id
        if not OTEL:  # with OpenTelemetry a root span gets the tracer's own trace id
            assert ctx.trace_id == root.id.replace("-", "")
        assert parsed[1] == ctx.span_id
        # explicit values win
        assert child_fields("mine", None, None)[0] == "mine"
        hdrs = request_headers({"x": "1"})
        assert hdrs is not None and hdrs["traceparent"] == tp and hdrs["x"] == "1"
        child = Event(type="t", source="s", correlationid=cid, causationid=cause, traceparent=tp)
        with consuming(child) as ctx2:
            assert ctx2.trace_id == ctx.trace_id and ctx2.parent_span_id == ctx.span_id
            assert ctx2.correlationid == root.id and ctx2.causationid == child.id
    assert current() is None


def test_bad_traceparent_starts_a_new_trace() -> None:
    assert parse_traceparent("00-xyz") is None
    assert parse_traceparent("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None
    ev = Event(type="t", source="s", traceparent="garbage")
    with consuming(ev) as ctx:
        assert ctx.parent_span_id is None and len(ctx.trace_id) == 32


def test_trace_filter_adds_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("zeromesh.test.trace")
    handler_filter = TraceFilter()
    caplog.handler.addFilter(handler_filter)
    ev = Event(type="t", source="s", stream="orders")
    with caplog.at_level(logging.INFO, logger=logger.name), consuming(ev):
        logger.info("handled")
    rec = caplog.records[-1]
    assert rec.correlation_id == ev.id  # type: ignore[attr-defined]
    assert rec.stream == "orders"  # type: ignore[attr-defined]
