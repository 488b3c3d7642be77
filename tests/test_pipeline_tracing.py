"""Trace context through the work queue: a task pushed inside a handler carries the pusher's
traceparent, correlation id and causation id (TASK frame, task log record), and the worker's
handler runs with them, so what it publishes stays in the pusher's trace and conversation."""

from __future__ import annotations

import threading
from pathlib import Path

import msgpack
import pytest

from mesh import Event, Node
from mesh.errors import LogError, ProtocolError
from mesh.tracing import consuming, context_from, current, parse_traceparent
from patterns.pipeline import Task, Worker, WorkQueue
from patterns.pipeline import frames as fr
from patterns.pipeline.store import QueueStore, decode_task, decode_task_traced, encode_task
from patterns.pubsub import Publisher, Start, Subscriber
from tests.util import unique

ROOT_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = (ROOT_TP, "conv-1", "ev-1")


# ---------------------------------------------------------------- pure: frames and records
def test_task_frame_carries_an_optional_trace_and_old_frames_still_decode() -> None:
    items = [(1, 1, 5000, None, b"x"), (2, 1, 10, "k", b"y", TRACE), (3, 2, 0, None, b"z", None)]
    cmd, ds = fr.decode(fr.encode_tasks(items))
    assert cmd == fr.TASK
    assert [d.trace for d in ds] == [None, TRACE, None]
    assert [d.payload for d in ds] == [b"x", b"y", b"z"]
    # A five-element item (an older producer) decodes with trace None.
    old = [fr.header(fr.TASK), msgpack.packb([[7, 1, 1, None, b"p"]], use_bin_type=True)]
    assert fr.decode(old)[1][0].trace is None


@pytest.mark.parametrize("trace", [5, [1, None, None], ["a", "b"], ["a", "b", "c", "d"], "tp",
                                   {"traceparent": "x"}])
def test_task_frame_with_a_malformed_trace_is_a_protocol_error(trace: object) -> None:
    body = msgpack.packb([[1, 1, 1, None, b"p", trace]], use_bin_type=True)
    with pytest.raises(ProtocolError):
        fr.decode([fr.header(fr.TASK), body])
    with pytest.raises(ProtocolError):  # and a seventh element is not a trace
        fr.decode([fr.header(fr.TASK), msgpack.packb([[1, 1, 1, None, b"p", None, None]])])


def test_task_record_round_trips_with_and_without_trace() -> None:
    assert decode_task_traced(encode_task(None, b"p")) == (None, b"p", None)
    assert decode_task_traced(encode_task("k", b"p")) == ("k", b"p", None)
    assert decode_task_traced(encode_task(None, b"p", TRACE)) == (None, b"p", TRACE)
    assert decode_task_traced(encode_task(b"k", b"p", TRACE)) == (b"k", b"p", TRACE)
    assert decode_task(encode_task("k", b"p", TRACE)) == ("k", b"p")
    # The pre-trace keyed form (two elements) still decodes.
    assert decode_task_traced(b"\x01" + msgpack.packb(["k", b"p"])) == ("k", b"p", None)
    for bad in (b"\x01" + msgpack.packb(["k", b"p", [1, 2, 3]]),
                b"\x01" + msgpack.packb(["k", b"p", None, None]), b"\x01\xc1", b"\x07x"):
        with pytest.raises(LogError):
            decode_task_traced(bad)


def test_recovery_keeps_the_trace_of_owed_tasks(tmp_path: Path) -> None:
    q = unique("q")
    store = QueueStore(tmp_path, q)
    store.tasks.append_many([encode_task(None, b"a"), encode_task("k", b"b", TRACE)])
    store.close()
    store = QueueStore(tmp_path, q)
    try:
        got = {t[0]: t[2] for t in store.recover().tasks}
    finally:
        store.close()
    assert got == {0: b"a", 1: (b"b", TRACE)}


# ---------------------------------------------------------------- real nodes
def test_event_published_by_a_worker_carries_the_pushers_trace_and_correlation(
        node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    src, dst, queue = unique("src"), unique("dst"), unique("q")
    consumed: list[str] = []
    tasks: list[Task] = []
    with Publisher(a, src) as pub_src, Subscriber(b, src, start=Start.beginning()) as sub, \
            WorkQueue(b, queue) as q, Worker(a, queue) as w, Publisher(a, dst) as pub_dst, \
            Subscriber(b, dst, start=Start.beginning()) as sub_dst:
        pub_src.publish({"order": 1}, correlationid="conv-1", traceparent=ROOT_TP)
        stop = threading.Event()

        def on_event(ev: Event) -> None:  # the subscriber's handler pushes a task
            consumed.append(ev.id)
            q.push(b"work")
            stop.set()

        sub.run(on_event, stop=stop)

        def on_task(task: Task) -> None:  # the worker's handler publishes an event
            tasks.append(task)
            pub_dst.publish({"done": True})  # no trace arguments given

        assert w.run(on_task, max_tasks=1) == 1
        derived = sub_dst.recv(timeout=10)
    assert derived is not None
    assert derived.correlationid == "conv-1"
    tp = parse_traceparent(derived.traceparent)
    assert tp is not None and tp[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert derived.causationid == consumed[0]
    (task,) = tasks
    assert task.trace is not None and task.trace[1:] == ("conv-1", consumed[0])
    pusher_tp = parse_traceparent(task.trace[0])
    assert pusher_tp is not None and pusher_tp[0] == tp[0]
    assert tp[1] != pusher_tp[1]  # the worker's handler has a span of its own


def test_untraced_push_gives_a_fresh_trace_and_push_many_keeps_the_context(node_pair: tuple[Node, Node]) -> None:
    a, b = node_pair
    queue = unique("q")
    seen: dict[bytes, tuple[str, str | None]] = {}
    with WorkQueue(b, queue) as q, Worker(a, queue) as w:
        q.push(b"plain")
        with consuming(ctx=context_from(event_id="0" * 31 + "1", traceparent=ROOT_TP,
                                        correlationid="conv-2")):
            q.push(b"traced")
            q.push_many([b"many1", b"many2"], key="k")

        def on_task(task: Task) -> None:
            c = current()
            assert c is not None
            seen[task.payload] = (c.trace_id, c.correlationid)

        stop = threading.Event()
        done = threading.Timer(20, stop.set)  # bound the run if a task never arrives
        done.start()
        try:
            w.run(on_task, max_tasks=4, stop=stop)
        finally:
            done.cancel()
    assert seen[b"traced"] == ("4bf92f3577b34da6a3ce929d0e0e4736", "conv-2")
    assert seen[b"many1"] == seen[b"many2"] == seen[b"traced"]
    assert seen[b"plain"][0] != "4bf92f3577b34da6a3ce929d0e0e4736"
