"""The DLQ over a long life: an index instead of scans, redrive off the queue's I/O thread,
compaction that shrinks the files, and redriven tasks that keep their trace context.

Real files, real sockets, a real `mesh dlq` child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from mesh.errors import DLQEntryNotFound
from mesh.node import Node
from mesh.tracing import consuming, context_from, parse_traceparent
from patterns.pipeline.dispatch import Attempt, DeadLetter, DispatchConfig
from patterns.pipeline.dlq import KILL_IN_COMPACTION_ENV, dlq_stream, encode_dead_letter, ops_stream
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.store import pipeline_root
from patterns.pipeline.worker import Worker
from tests.util import REPO, python_child, unique, wait_until

N_DEAD = 20_000
LATE_S = 3.0  # a generous bound (ack_wait is 5 s): normal push-to-delivery takes milliseconds
ROOT_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _node(data_dir: Path) -> Node:
    return Node(data_dir=data_dir, mesh=unique("m"), interface="127.0.0.1", mdns=False)


def write_dead_letters(data_dir: Path, queue: str, n: int) -> None:
    """A DLQ of ``n`` entries in the producer's record format (payload ``dead-<i>``), written
    with a plain log as an older version did (no retention floor yet)."""
    att = Attempt(1, "w", 1.0, 2.0, "nack", "RuntimeError", "disk on fire",
                  "Traceback (most recent call last):\n  ...\nRuntimeError: disk on fire\n")
    lg = pipeline_root(data_dir).open(dlq_stream(queue))
    try:
        for k in range(0, n, 1000):
            lg.append_many([
                encode_dead_letter(queue, "node-x",
                                   DeadLetter(i, None, "max_deliveries", 1, [att]),
                                   f"dead-{i}".encode(), 1.0)
                for i in range(k, min(n, k + 1000))
            ])
    finally:
        lg.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_100_redrives_of_a_20k_dlq_while_tasks_flow_then_compaction(tmp_path: Path) -> None:
    queue = unique("q")
    write_dead_letters(tmp_path, queue, N_DEAD)
    seen: Counter[bytes] = Counter()
    deliveries: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    pushed: list[int] = []
    pushed_at: dict[bytes, float] = {}
    late: list[float] = []  # push-to-delivery waits longer than LATE_S
    with _node(tmp_path) as node, \
            WorkQueue(node, queue, config=DispatchConfig(ack_wait=5.0)) as q, \
            Worker(node, queue, credit=20) as w:

        def work() -> None:
            while not stop.is_set():
                t = w.get(timeout=0.05)
                if t is None:
                    continue
                waited = time.monotonic() - pushed_at.get(t.payload, time.monotonic())
                with lock:
                    if waited > LATE_S:
                        late.append(waited)
                    seen[t.payload] += 1
                    deliveries[t.delivery] += 1
                t.ack()

        def push() -> None:
            i = 0
            while not stop.wait(0.002):
                pushed_at[f"job-{i}".encode()] = time.monotonic()
                q.push(f"job-{i}".encode())
                pushed.append(i)
                i += 1

        threads = [threading.Thread(target=work), threading.Thread(target=push)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: q.stats().get("acked", 0) >= 50, 10, what="tasks flowing")
            # 100 redrive requests recorded at once, as `mesh dlq redrive` in another process
            # records them beside a running producer (the producer fulfils them), and 100
            # redrives from this process through the producer's API.
            ops = pipeline_root(tmp_path).open(ops_stream(queue))
            try:
                ops.append_many([msgpack.packb({"op": "redrive_requested", "entry": o,
                                                "at": time.time(), "by": "cli"})
                                 for o in range(100)])
            finally:
                ops.close()
            for o in range(100, 200):
                assert q.dlq.redrive(o).status == "redriven"
            wait_until(lambda: all(seen[f"dead-{i}".encode()] for i in range(200)), 20,
                       what="the 200 redriven tasks")
            stop.set()
            for t in threads:
                t.join(10)
            w.flush()
            q.wait_idle(10)
        finally:
            stop.set()
        s = q.stats()
        # Push-to-ack stayed bounded: no normal task waited anywhere near ack_wait for its
        # dispatch (a DLQ scan on the I/O thread held every push for seconds), none timed out
        # and ran again.
        assert late == [], f"{len(late)} tasks waited over {LATE_S} s, up to {max(late):.1f} s"
        assert s["timeouts"] == 0 and s["redelivered"] == 0, s
        assert set(deliveries) == {1}
        assert all(seen[f"job-{i}".encode()] == 1 for i in pushed)
        assert all(seen[f"dead-{i}".encode()] == 1 for i in range(200))
        assert q.dlq.counts() == {"dead": N_DEAD - 200, "redrive_requested": 0,
                                  "redriven": 200, "discarded": 0}

        # Compaction: resolve most entries; the producer's DLQ thread drops them from disk.
        before = q.dlq.disk_bytes()
        q.dlq.discard_many(range(200, N_DEAD - 500))
        wait_until(lambda: q.dlq.compactions >= 1, 10, what="compaction")
        after = q.dlq.disk_bytes()
        assert after < before / 4, (before, after)
        assert len(q.dlq.list()) == 500
        assert q.dlq.total() == N_DEAD  # dead letters ever: compaction copies do not count
        shown = q.dlq.show(N_DEAD - 1)  # a live entry keeps its id and content
        assert (shown.offset, shown.payload, shown.status) == \
            (N_DEAD - 1, f"dead-{N_DEAD - 1}".encode(), "dead")
    # After a restart the index is rebuilt from the compacted files: same ids, same statuses.
    with _node(tmp_path) as node, WorkQueue(node, queue) as q:
        live = q.dlq.list()
        assert [e.offset for e in live] == list(range(N_DEAD - 500, N_DEAD))
        assert [e.payload for e in live[:2]] == [b"dead-19500", b"dead-19501"]
        assert q.dlq.total() == N_DEAD
        with pytest.raises(DLQEntryNotFound):
            q.dlq.show(5)  # redriven, then compacted away
        assert q.dlq.redrive(N_DEAD - 1).redriven_task_id is not None
    r = _cli("dlq", "list", str(tmp_path), queue, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"offset"') == 499


def test_redriven_task_keeps_its_original_trace(tmp_path: Path) -> None:
    queue = unique("q")
    with _node(tmp_path) as node, \
            WorkQueue(node, queue, config=DispatchConfig(max_deliveries=1)) as q, \
            Worker(node, queue, credit=5) as w:
        with consuming(ctx=context_from(event_id="0" * 31 + "1", traceparent=ROOT_TP,
                                        correlationid="conv-9")):
            q.push(b"traced-job")
        t = wait_until(lambda: w.get(timeout=0.05), 10, what="task")
        t.nack(error=RuntimeError("boom"))
        w.flush()
        [e] = wait_until(lambda: q.dlq.list(), 10, what="dead letter")
        original = t.trace
        assert original is not None and e.trace == original  # kept in the DLQ record
        assert e.to_dict()["traceparent"] == original[0]
        q.dlq.redrive(e.offset)
        t2 = wait_until(lambda: w.get(timeout=0.05), 10, what="redriven task")
        assert t2.payload == b"traced-job" and t2.trace is not None
        parsed = parse_traceparent(t2.trace[0])
        assert parsed is not None and parsed[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert t2.trace == original  # the original task's traceparent and correlation
        t2.ack()
        w.flush()


def test_an_unreadable_dlq_record_is_counted_and_skipped(tmp_path: Path) -> None:
    queue = unique("q")
    write_dead_letters(tmp_path, queue, 2)
    lg = pipeline_root(tmp_path).open(dlq_stream(queue))
    try:
        lg.append(b"\xc1 not a dead letter")  # a good log record with a bad body
    finally:
        lg.close()
    lg2 = pipeline_root(tmp_path).open(dlq_stream(queue))
    try:
        lg2.append(
            encode_dead_letter(queue, "node-x", DeadLetter(9, None, "term", 1, []), b"dead-9",
                               1.0))
    finally:
        lg2.close()
    r = _cli("dlq", "list", str(tmp_path), queue, "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"offset"') == 3
    with _node(tmp_path) as node, WorkQueue(node, queue) as q:
        assert [e.payload for e in q.dlq.list()] == [b"dead-0", b"dead-1", b"dead-9"]
        assert q.dlq.unreadable == 1
        assert q.dlq.redrive(3).redriven_task_id is not None


_COMPACT_CHILD = """
import json, os, sys
from pathlib import Path
from mesh.node import Node
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.dlq import dlq_stream
from patterns.pipeline.store import pipeline_root
d, queue = Path(sys.argv[1]), sys.argv[2]
with Node(data_dir=d, mesh="m-" + queue, interface="127.0.0.1", mdns=False) as node, \\
        WorkQueue(node, queue) as q:
    q.dlq.redrive_many(range(100))
    q.dlq.discard_many(range(200, 5800))
    path = pipeline_root(d).path_for(dlq_stream(queue))
    print(json.dumps({f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}),
          flush=True)
    q.dlq.compact()
print("compacted", flush=True)
"""


@pytest.mark.parametrize("step", ["copied", "trimmed", "ops"])
def test_kill_9_at_each_step_of_compaction_loses_and_revives_nothing(tmp_path: Path,
                                                                     step: str) -> None:
    queue = unique("q")
    write_dead_letters(tmp_path, queue, 6000)
    p = python_child(_COMPACT_CHILD, str(tmp_path), queue,
                     env={KILL_IN_COMPACTION_ENV: step}, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == -9, out
    if step == "copied":
        # A power cut: the copies were not fsynced yet; cut the grown files back.
        sizes = json.loads(out.decode().splitlines()[0])
        path = pipeline_root(tmp_path).path_for(dlq_stream(queue))
        for f, size in sizes.items():
            full = os.path.join(path, f)
            if f.endswith(".log") and os.path.getsize(full) > size:
                os.truncate(full, size)
    live = set(range(100, 200)) | set(range(5800, 6000))
    with _node(tmp_path) as node, WorkQueue(node, queue) as q:
        assert q.recovered == 100  # the redriven tasks are owed, once
        got = q.dlq.list()
        assert {e.offset for e in got} == live  # nothing lost, nothing resolved came back
        assert all(e.payload == f"dead-{e.offset}".encode() for e in got)
        q.dlq.compact()
        assert {e.offset for e in q.dlq.list()} == live
        assert q.dlq.total() == 6000
    with _node(tmp_path) as node, WorkQueue(node, queue) as q:
        assert {e.offset for e in q.dlq.list()} == live


def test_one_dlq_thread_serves_every_queue_of_a_process(tmp_path: Path) -> None:
    def dlq_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "pipe-dlq")

    with _node(tmp_path) as node:
        queues = [WorkQueue(node, unique("q")) for _ in range(40)]
        try:
            assert dlq_threads() == 1
            for q in queues:
                assert q.dlq.counts()["dead"] == 0
        finally:
            for q in queues:
                q.close()
    wait_until(lambda: dlq_threads() == 0, 5, what="the DLQ thread to exit")


def test_dead_letter_names_the_last_error_not_a_final_timeout() -> None:
    """A poison task whose last delivery timed out (or whose worker left) is still recorded
    with the error its handler raised: the top-level error fields are the last attempt that
    reported one; every attempt stays in the history."""
    import msgpack

    from patterns.pipeline.dispatch import Attempt, DeadLetter
    from patterns.pipeline.dlq import encode_dead_letter

    history = [Attempt(1, "w1", 0.0, 1.0, "nack", "ValueError", "out of range", "tb"),
               Attempt(2, "w2", 1.0, 31.0, "timeout")]
    rec = msgpack.unpackb(encode_dead_letter(
        "q", "p", DeadLetter(7, None, "max_deliveries", 2, history), b"x", 31.0))
    assert (rec["error_type"], rec["error_message"]) == ("ValueError", "out of range")
    assert [h["outcome"] for h in rec["history"]] == ["nack", "timeout"]
