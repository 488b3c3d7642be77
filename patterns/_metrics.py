"""The patterns' metrics: scrape-time collectors over the counters each object already keeps.

Every pattern object counts what it does in its own stats (plain ints, under its own lock);
nothing here runs per event except :class:`Processing` around a handler call. A collector is
registered on ``node.metrics`` when the object is made and unregistered at ``close()``; at
scrape time it reads the object's ``stats()`` and reports the families of
docs/architecture.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mesh.metrics import Collect, Registry

__all__ = [
    "Processing",
    "attach",
    "client_collector",
    "publisher_collector",
    "pubsub_hub_collector",
    "queue_collector",
    "service_collector",
    "subscriber_collector",
    "worker_collector",
]


def _noop() -> None:
    return None


def attach(node: Any, collector: Callable[[Collect], None]) -> Callable[[], None]:
    """Register ``collector`` on the node's registry; returns the unregister function (a no-op
    for a node without ``metrics``, e.g. a test double)."""
    reg = getattr(node, "metrics", None)
    if not isinstance(reg, Registry):
        return _noop
    return reg.register_collector(collector)


class Processing:
    """Times handler calls: ``event_processing_duration_seconds``, ``events_consumed_total``
    and ``event_processing_errors_total`` for one (kind, name). Children are bound once, so a
    call costs two ``perf_counter()`` reads and a histogram observation (about 0.5 µs)."""

    def __init__(self, node: Any, kind: str, name: str, consumer: str | None = None) -> None:
        reg = getattr(node, "metrics", None)
        self._consumed: Any = None
        self.enabled = isinstance(reg, Registry)
        if not isinstance(reg, Registry):
            return
        self._hist = reg.histogram(
            "event_processing_duration_seconds",
            "Time a handler took per event, task or request.", ("kind", "name")
        ).labels(kind, name)
        self._errors = reg.counter(
            "event_processing_errors_total", "Handler calls that raised.", ("kind", "name")
        ).labels(kind, name)
        if consumer is not None:  # workers: nothing else counts what they consumed
            self._consumed = reg.counter(
                "events_consumed_total", "Events delivered to consumers.",
                ("stream", "consumer", "pattern")).labels(name, consumer, kind)

    def observe(self, started: float, failed: bool) -> None:
        """Record one handler call that began at ``started`` (``time.perf_counter()``)."""
        if not self.enabled:
            return
        self._hist.observe(time.perf_counter() - started)
        if self._consumed is not None:
            self._consumed.inc()
        if failed:
            self._errors.inc()


def _log_families(out: Collect, log: Any, lock: Any, **labels: str) -> None:
    if log is None:
        return
    with lock:
        s = log.stats()
    out.gauge("log_bytes", s.bytes, "Bytes held by a durable log.", **labels)
    out.gauge("log_records", s.records, "Records held by a durable log.", **labels)
    out.gauge("log_segments", s.segments, "Segment files of a durable log.", **labels)
    out.counter("log_fsyncs_total", s.fsyncs, "fsync calls of a durable log.", **labels)
    out.gauge("log_fsync_latency_avg_seconds", s.fsync_latency_avg_s,
              "Mean fsync latency of a durable log.", **labels)
    out.gauge("log_fsync_latency_max_seconds", s.fsync_latency_max_s,
              "Worst fsync latency of a durable log.", **labels)


def publisher_collector(pub: Any) -> Callable[[Collect], None]:
    """Families of one :class:`~patterns.pubsub.Publisher` (label ``stream``)."""

    def collect(out: Collect) -> None:
        s = pub.stats()
        out.counter("events_published_total", s.published, "Events published.",
                    stream=s.stream, pattern="pubsub")
        out.gauge("stream_head", s.head, "Next sequence number of a stream.", stream=s.stream)
        out.counter("data_bytes_out_total", s.bytes_out,
                    "Bytes sent on the patterns' data sockets.", pattern="pubsub",
                    stream=s.stream)
        out.counter("replays_served_total", s.replay_requests,
                    "Replay requests answered from the log.", stream=s.stream)
        out.counter("replay_events_served_total", s.replay_events,
                    "Events sent in replay replies.", stream=s.stream)
        out.counter("replays_beyond_retention_total", s.replay_gone,
                    "Replay requests for events retention had deleted.", stream=s.stream)
        out.gauge("stream_subscribers", s.subscribers,
                  "Subscriber connections a stream is sent to.", stream=s.stream)
        for name, lag in s.lag.items():
            out.gauge("consumer_lag", lag, "Events a consumer still has to process.",
                      stream=s.stream, consumer=name, side="publisher")
        _log_families(out, pub._log, pub._hub.lock, stream=s.stream)

    return collect


def store_collector(store: Any) -> Callable[[Collect], None]:
    """Families of a replicated-stream :class:`~patterns.pubsub.store.Store` (one per node)."""

    def collect(out: Collect) -> None:
        s = store.stats()
        out.counter("store_events_appended_total", s.appended,
                    "Envelopes a store wrote to its copies.")
        out.counter("store_fetches_total", s.fetches, "Fetches a store answered from a copy.",
                    result="served")
        out.counter("store_fetches_total", s.fetch_refused,
                    "Fetches a store answered from a copy.", result="refused")
        out.counter("store_write_errors_total", s.write_errors,
                    "Copy writes that failed (asked for again).")
        for h in store.holdings():
            out.gauge("store_replica_head", h.head,
                      "Next seq of an origin's stream a store holds.", origin=h.origin,
                      stream=h.stream)
        for (origin, stream), lag in store.lag().items():
            out.gauge("store_replica_lag", lag,
                      "Seqs a store's copy is behind the origin's head as it last heard it.",
                      origin=origin, stream=stream)

    return collect


def pubsub_hub_collector(hub: Any) -> Callable[[Collect], None]:
    """Node-wide families of the pub/sub publishing hub: its subscription budgets on the data
    socket and what its replay and ack budgets refused (one sample per node, whatever the
    number of publishers)."""

    def collect(out: Collect) -> None:
        with hub.lock:  # budgets change under it; the rest are plain ints
            b = hub.budget_stats()
            acks_held = hub.ack_peer_budget.held()
            acks_refused = hub.acks_refused
        out.gauge("pubsub_subscriptions", b["subscriptions_held"],
                  "Subscriptions the pub/sub data socket holds.")
        out.gauge("pubsub_subscriber_connections", b["subscriber_connections"],
                  "Subscriber connections holding a subscription.")
        out.counter("pubsub_subscriptions_refused_total", b["subscriptions_refused"],
                    "Subscription requests refused (forbidden, over budget, malformed).")
        out.counter("pubsub_subscriptions_over_budget_total",
                    b["subscriptions_refused_by_budget"],
                    "Subscription requests refused by a per-connection, per-peer or node cap.")
        for reason, v in (("busy", hub.replay_busy), ("dropped", hub.replay_dropped),
                          ("forbidden", hub.refused_replays)):
            out.counter("replay_refused_total", v, "Replay requests refused: over the "
                        "peer's replay byte budget or backed up (busy), not even answered "
                        "(dropped), not permitted (forbidden).", reason=reason)
        out.gauge("replay_bytes_held", hub.replay_budget.held(),
                  "Replay bytes sent to peers and not yet proven read.")
        out.counter("acks_refused_total", acks_refused,
                    "Acks refused: not permitted, or the positions budget was full.")
        out.gauge("ack_positions", acks_held, "Durable-subscriber positions held.")

    return collect


def subscriber_collector(sub: Any) -> Callable[[Collect], None]:
    """Families of one :class:`~patterns.pubsub.Subscriber` (labels ``stream``=its topic and
    ``consumer``=its durable name, or ``~`` + a short id for an ephemeral one)."""
    consumer = sub.durable or f"~{sub.sid[:8]}"

    def collect(out: Collect) -> None:
        s = sub.stats()
        lab = {"stream": sub.topic, "consumer": consumer}
        out.counter("events_consumed_total", s.delivered, "Events delivered to consumers.",
                    pattern="pubsub", **lab)
        out.gauge("consumer_lag", s.lag, "Events a consumer still has to process.",
                  side="subscriber", **lab)
        out.counter("data_bytes_in_total", s.bytes_in,
                    "Bytes received on the patterns' data sockets.", pattern="pubsub", **lab)
        out.counter("hwm_gaps_recovered_total", s.gaps,
                    "Sequence gaps (HWM drops, reconnects) detected and replayed.", **lab)
        out.counter("events_recovered_total", s.replayed,
                    "Events received through replay (gap recovery, catch-up).", **lab)
        out.counter("events_duplicate_total", s.duplicates, "Duplicate events dropped.", **lab)
        out.counter("events_lost_total", s.skipped,
                    "Events skipped for good (best-effort streams, retention).", **lab)
        out.counter("events_malformed_total", s.bad_frames + s.bad_version + s.oversize
                    + s.bad_events, "Malformed, oversized or unknown-version messages.", **lab)
        out.counter("replay_requests_deferred_total", s.replay_deferred,
                    "Replay requests held back by the per-publisher rate or outstanding "
                    "limit.", **lab)
        out.counter("replay_busy_total", s.replay_busy,
                    "Replay requests a publisher refused as busy (retried with backoff).",
                    **lab)
        out.counter("forged_data_total", s.forged_data,
                    "DATA/HEARTBEAT messages dropped: their header named another publisher "
                    "than the one the connection was made to.", **lab)
        out.counter("subscriptions_refused_total", s.subscriptions_refused,
                    "Subscription requests a publisher refused (REFUSED notices).", **lab)
        out.counter("packed_messages_total", s.packed_messages,
                    "DATA messages received in the packed layout (pub/sub 2.4).", **lab)
        out.counter("unpacked_publishers_total", s.unpacked_publishers,
                    "Publisher connections that refused the packed layout (an older "
                    "publisher: one frame per event).", **lab)

    return collect


class _DlqPending:
    """``dlq_events_pending`` recomputed only when the DLQ or its operations log grew."""

    def __init__(self) -> None:
        self.key: tuple[int, int] = (-1, -1)
        self.value = 0


def queue_collector(q: Any) -> Callable[[Collect], None]:
    """Families of one :class:`~patterns.pipeline.WorkQueue` (label ``queue``)."""
    cache = _DlqPending()

    def collect(out: Collect) -> None:
        s = q.stats()
        name = q.name
        out.counter("events_published_total", s.get("added", 0), "Events published.",
                    stream=name, pattern="pipeline")
        out.counter("tasks_acked_total", s.get("acked", 0), "Tasks acknowledged by workers.",
                    queue=name)
        out.counter("redeliveries_total", s.get("redelivered", 0),
                    "Tasks delivered again (nack, deadline, worker lost).", queue=name)
        out.counter("tasks_nacked_total", s.get("nacked", 0), "Tasks nacked.", queue=name)
        out.counter("task_timeouts_total", s.get("timeouts", 0),
                    "Deliveries whose ack deadline passed.", queue=name)
        out.gauge("consumer_lag", s.get("unacked", 0), "Events a consumer still has to process.",
                  stream=name, consumer="*", side="queue")
        for g in ("pending", "inflight", "delayed", "workers"):
            out.gauge(f"queue_{g}", s.get(g, 0), f"Queue gauge: {g}.", queue=name)
        total = int(q.dlq.total())  # the DLQ's index follows its files: no record scan
        out.counter("dlq_events_total", total, "Tasks dead-lettered (ever).", queue=name)
        key = (total, q.dlq.ops_count())
        if key != cache.key:
            c = q.dlq.counts()
            cache.value = c["dead"] + c["redrive_requested"]
            cache.key = key
        out.gauge("dlq_events_pending", cache.value,
                  "Dead letters neither redriven nor discarded.", queue=name)
        out.gauge("queue_disk_full", int(bool(s.get("disk_full"))),
                  "1 while a full disk holds the queue's journal writes (dispatch paused).",
                  queue=name)
        out.counter("queue_disk_full_events_total", s.get("disk_full_events", 0),
                    "Times a full disk paused the queue.", queue=name)
        out.gauge("queue_lost_tasks", s.get("lost_tasks", 0),
                  "Task ids the journal knew that the task log lost (last recovery).",
                  queue=name)
        out.counter("queue_worker_disconnects_total", s.get("disconnects", 0),
                    "Workers removed because their connection ended.", queue=name)
        lab = {"pattern": "pipeline", "side": "queue", "queue": name}
        out.counter("data_bytes_in_total", s.get("bytes_in", 0),
                    "Bytes received on the patterns' data sockets.", **lab)
        out.counter("data_bytes_out_total", s.get("bytes_out", 0),
                    "Bytes sent on the patterns' data sockets.", **lab)

    return collect


def worker_collector(w: Any) -> Callable[[Collect], None]:
    """Data-socket bytes of one :class:`~patterns.pipeline.Worker` (labels ``pattern``,
    ``side="worker"``, ``queue``)."""

    def collect(out: Collect) -> None:
        s = w.stats()
        lab = {"pattern": "pipeline", "side": "worker", "queue": w.queue}
        out.counter("data_bytes_in_total", s["bytes_in"],
                    "Bytes received on the patterns' data sockets.", **lab)
        out.counter("data_bytes_out_total", s["bytes_out"],
                    "Bytes sent on the patterns' data sockets.", **lab)

    return collect


def service_collector(svc: Any) -> Callable[[Collect], None]:
    """Families of one :class:`~patterns.reqrep.Service` (label ``service``)."""

    def collect(out: Collect) -> None:
        s = svc.stats()
        lab = {"service": svc.name}
        out.counter("requests_served_total", s.executed, "Requests executed by a handler.",
                    **lab)
        out.counter("request_cache_hits_total", s.cache_hits,
                    "Retried requests answered from the reply cache.", **lab)
        out.counter("requests_busy_total", s.busy, "Requests refused as busy.", **lab)
        out.gauge("requests_running", s.running, "Requests being executed.", **lab)
        out.counter("data_bytes_in_total", s.bytes_in,
                    "Bytes received on the patterns' data sockets.", pattern="reqrep",
                    side="service", **lab)
        out.counter("data_bytes_out_total", s.bytes_out,
                    "Bytes sent on the patterns' data sockets.", pattern="reqrep",
                    side="service", **lab)

    return collect


def client_collector(client: Any) -> Callable[[Collect], None]:
    """Data-socket bytes of one request/reply client (sync or async; labels ``pattern``,
    ``side="client"`` and ``client`` = ``~`` + a short id, so two clients of a node differ)."""
    cid = f"~{id(client) & 0xFFFFFF:06x}"

    def collect(out: Collect) -> None:
        s = client.stats()
        lab = {"pattern": "reqrep", "side": "client", "client": cid}
        out.counter("data_bytes_in_total", s.bytes_in,
                    "Bytes received on the patterns' data sockets.", **lab)
        out.counter("data_bytes_out_total", s.bytes_out,
                    "Bytes sent on the patterns' data sockets.", **lab)

    return collect
