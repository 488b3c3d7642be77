"""Metrics and tracing on real nodes and sockets: node.stats(), the HTTP endpoint in the
Prometheus text format, and trace context from a consumed event to what its handler sends."""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

from mesh import Event, Node
from mesh.metrics import parse_prometheus, serve_prometheus
from mesh.tracing import OTEL, parse_traceparent
from patterns.pipeline import Backoff, DispatchConfig, Task, Worker, WorkQueue
from patterns.pubsub import Publisher, Start, Subscriber
from patterns.reqrep import Client, Incoming, Service
from tests.util import unique, wait_until


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], metric: str, /,
           **labels: str) -> float:
    for lab, v in samples.get(metric, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    raise AssertionError(f"no {metric}{labels} in {sorted(samples)}")


def test_endpoint_serves_the_issue_metrics_in_text_format(node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    topic, queue = unique("s"), unique("q")
    cfg = DispatchConfig(max_deliveries=1, backoff=Backoff(base=0.01, cap=0.02))
    with Publisher(a, topic) as pub, Subscriber(b, topic, durable="agg",
                                                start=Start.beginning()) as sub, \
            WorkQueue(a, queue, config=cfg) as q, Worker(b, queue) as w:
        pub.publish_many([{"i": i} for i in range(10)])
        got = [sub.recv(timeout=10) for _ in range(10)]
        assert all(e is not None for e in got)
        sub.commit()
        for payload in (b"ok", b"ok", b"bad"):
            q.push(payload)

        def handler(t: Task) -> None:
            if t.payload == b"bad":
                raise ValueError("bad task")

        done = 0
        while done < 3:
            task = w.get(timeout=5)
            assert task is not None
            w.handle(task, handler)
            done += 1
        w.flush()
        wait_until(lambda: q.stats().get("unacked", 1) == 0, 10, what="queue drained")
        server_a, port_a = serve_prometheus(a)
        server_b, port_b = serve_prometheus(b)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port_a}/metrics", timeout=5) as r:
                assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                text_a = r.read().decode()
            with urllib.request.urlopen(f"http://127.0.0.1:{port_b}/metrics", timeout=5) as r:
                text_b = r.read().decode()
        finally:
            server_a.close()
            server_b.close()
    # text format: every family has HELP and TYPE before its samples
    lines = text_a.splitlines()
    assert lines.index("# TYPE events_published_total counter") < next(
        i for i, ln in enumerate(lines) if ln.startswith("events_published_total{"))
    sa, sb = parse_prometheus(text_a), parse_prometheus(text_b)
    assert _value(sa, "events_published_total", stream=topic, pattern="pubsub") == 10
    assert _value(sa, "events_published_total", stream=queue, pattern="pipeline") == 3
    assert _value(sb, "events_consumed_total", stream=topic, consumer="agg") == 10
    assert _value(sb, "events_consumed_total", stream=queue, pattern="pipeline") == 3
    assert _value(sb, "event_processing_duration_seconds_count", kind="pipeline",
                  name=queue) == 3
    assert _value(sb, "event_processing_duration_seconds_bucket", kind="pipeline", name=queue,
                  le="+Inf") == 3
    assert _value(sb, "event_processing_errors_total", kind="pipeline", name=queue) == 1
    assert _value(sa, "dlq_events_total", queue=queue) == 1
    assert _value(sa, "dlq_events_pending", queue=queue) == 1
    assert _value(sa, "queue_disk_full", queue=queue) == 0
    assert _value(sa, "queue_lost_tasks", queue=queue) == 0
    assert _value(sa, "queue_worker_disconnects_total", queue=queue) >= 0
    assert _value(sb, "consumer_lag", stream=topic, consumer="agg", side="subscriber") == 0
    assert _value(sa, "peers", state="joined") == 1
    assert _value(sa, "control_bytes_in_total") > 0 and _value(sa, "control_bytes_out_total") > 0
    assert _value(sa, "log_records", stream=topic) == 10
    assert _value(sa, "log_fsync_latency_max_seconds", stream=topic) >= 0
    for name in ("redeliveries_total", "replays_served_total", "hwm_gaps_recovered_total",
                 "handshake_failures_total"):
        assert name in sa or name in sb, name


def test_node_stats_include_the_metrics(node_pair: tuple[Node, Node]) -> None:
    a, _ = node_pair
    topic = unique("s")
    with Publisher(a, topic) as pub:
        pub.publish(b"x")
        st = a.stats()
    m = st["metrics"]
    assert m["events_published_total"]["type"] == "counter"
    assert [s["value"] for s in m["events_published_total"]["samples"]
            if s["labels"].get("stream") == topic] == [1]
    assert m["peers"]["type"] == "gauge"
    assert "control_messages_in_total" in m


def test_trace_context_flows_from_consumed_event_to_published_event_and_request(
        node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    src, dst, svc = unique("src"), unique("dst"), unique("svc")
    seen_headers: list[dict[str, str]] = []

    def serve(req: Incoming) -> object:
        seen_headers.append(dict(req.headers))
        return b"ok"

    with Service(a, svc, serve), Publisher(a, src) as pub_src, Publisher(b, dst) as pub_dst, \
            Client(b) as client, Subscriber(b, src, start=Start.beginning()) as sub, \
            Subscriber(a, dst, start=Start.beginning()) as sub_dst:
        wait_until(lambda: b.who_offers("service", svc), 10, what="service offered")
        root_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        pub_src.publish({"order": 1}, correlationid="conv-1", traceparent=root_tp)
        stop = threading.Event()

        consumed: list[str] = []

        def handler(ev: Event) -> None:
            consumed.append(ev.id)
            pub_dst.publish({"derived": True})       # no trace arguments given
            client.request(svc, b"x", timeout=5)   # nor here
            stop.set()

        sub.run(handler, stop=stop)
        derived = sub_dst.recv(timeout=10)
    assert derived is not None
    assert derived.correlationid == "conv-1"
    tp = parse_traceparent(derived.traceparent)
    assert tp is not None and tp[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tp[1] != "00f067aa0ba902b7"  # a new span: the handler's
    assert derived.causationid == consumed[0]
    (h,) = seen_headers
    req_tp = parse_traceparent(h["traceparent"])
    assert req_tp is not None and req_tp[0] == tp[0]
    if not OTEL:  # with OpenTelemetry the request has its own span under the handler's
        assert req_tp[1] == tp[1]
    assert h["correlationid"] == "conv-1" and h["causationid"] == derived.causationid


def test_service_handler_context_reaches_its_nested_request(node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    outer, inner = unique("outer"), unique("inner")
    got: dict[str, Any] = {}

    with Client(a) as ca:
        def inner_h(req: Incoming) -> object:
            got["inner"] = dict(req.headers)
            return b"in"

        def outer_h(req: Incoming) -> object:
            got["outer"] = dict(req.headers)
            got["outer_id"] = req.id
            return ca.request(inner, b"y", timeout=5)

        with Service(b, inner, inner_h), Service(a, outer, outer_h), Client(b) as cb:
            wait_until(lambda: b.who_offers("service", outer) and a.who_offers("service", inner),
                       10, what="services")
            assert cb.request(outer, b"x", timeout=5, correlationid="c-9") == b"in"
    assert got["inner"]["correlationid"] == "c-9"
    assert got["inner"]["causationid"] == got["outer_id"]
    tp = parse_traceparent(got["inner"]["traceparent"])
    assert tp is not None
    outer_tp = parse_traceparent(got["outer"].get("traceparent"))
    if outer_tp is not None:  # an OTel request span (a tracer provider is set): its trace
        assert OTEL and tp[0] == outer_tp[0]
    else:  # no context at the outer caller: the outer request id names the trace
        assert tp[0] == got["outer_id"].replace("-", "")
