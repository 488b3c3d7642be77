"""Pipeline end to end: real sockets, real files, real processes really SIGKILLed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh.node import Node, PresenceConfig
from patterns.pipeline import frames as fr
from patterns.pipeline.backoff import Backoff
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue, role_for
from patterns.pipeline.store import pipeline_root
from patterns.pipeline.worker import Task, Worker
from tests.util import python_child, unique, wait_until

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)
CHILD = "import tests.pipeline_child as c; c.main()"


def make_node(path: Path, mesh: str, name: str, peer: str | None = None) -> Node:
    return Node(data_dir=path, name=name, mesh=mesh, interface="127.0.0.1", mdns=False,
                presence=PRESENCE, static_peers=(peer,) if peer else ())


def ctrl(node: Node) -> str:
    return next(e for e in node.info().endpoints["control"] if e.startswith("tcp://"))


@pytest.fixture
def mesh_name() -> str:
    return unique("pm")


@pytest.fixture
def hub(tmp_path: Path, mesh_name: str) -> Iterator[Node]:
    node = make_node(tmp_path / "hub", mesh_name, "hub")
    yield node
    node.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def journal_acks(data_dir: Path, queue: str) -> list[int]:
    log = pipeline_root(data_dir).open(f"{queue}.journal", readonly=True)
    try:
        out: list[int] = []
        for r in log.iter(0):
            j = msgpack.unpackb(r.payload, raw=False)
            if j[0] == "A":
                out.extend(j[1])
        return out
    finally:
        log.close()


def spawn_worker(procs: list[subprocess.Popen[bytes]], tmp: Path, mesh: str, peer: str,
                 queue: str, credit: int, behaviour: str) -> subprocess.Popen[bytes]:
    p = python_child(CHILD, "worker", str(tmp / unique("w")), mesh, peer, queue, str(credit),
                     behaviour, stdout=subprocess.DEVNULL)
    procs.append(p)
    return p


def test_workers_sigkilled_at_random_every_task_acked_once(
    tmp_path: Path, hub: Node, mesh_name: str, children: list[subprocess.Popen[bytes]]
) -> None:
    queue = unique("q")
    n = 3000
    cfg = DispatchConfig(ack_wait=2.0, max_deliveries=50)
    with WorkQueue(hub, queue, config=cfg, seed=1) as q:
        alive = [spawn_worker(children, tmp_path, mesh_name, ctrl(hub), queue, 20, "slow")
                 for _ in range(3)]
        for base in range(0, n, 100):
            q.push_many([f"t{i}".encode() for i in range(base, base + 100)])
        rng = random.Random(5)
        kills = 0
        deadline = time.monotonic() + 45
        while q.stats().get("acked", 0) < n and time.monotonic() < deadline:
            if kills < 6 and q.stats().get("acked", 0) > (kills + 1) * n // 8:
                victim = alive.pop(rng.randrange(len(alive)))
                victim.send_signal(signal.SIGKILL)
                victim.wait(5)
                kills += 1
                alive.append(spawn_worker(children, tmp_path, mesh_name, ctrl(hub), queue, 20,
                                          "slow"))
            time.sleep(0.02)  # poll interval of the kill loop
        q.wait_idle(timeout=10)
        s = q.stats()
        assert kills >= 3, f"only {kills} kills happened: {s}"
        assert s["acked"] == n and s["unacked"] == 0 and s["dead_lettered"] == 0
        # (No count of workers_lost: a killed worker is removed by presence, by its
        # connection's end or by a failed send, and when depends on load; what matters is
        # below: every task acked, none twice.)
    acks = journal_acks(hub.data_dir, queue)
    assert sorted(acks) == list(range(n))  # complete, and no id acked twice


def test_producer_sigkilled_and_restarted_loses_nothing(
    tmp_path: Path, hub: Node, mesh_name: str, children: list[subprocess.Popen[bytes]]
) -> None:
    queue = unique("q")
    n = 2000
    pdir = tmp_path / "producer"
    seen: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        with Worker(hub, queue, credit=20) as w:
            while not stop.is_set():
                task: Task | None = w.get(timeout=0.1)
                if task is None:
                    continue
                with lock:
                    seen.add(int(task.payload.split(b"-")[1]))
                task.ack()

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        p1 = python_child(CHILD, "producer", str(pdir), mesh_name, ctrl(hub), queue, str(n),
                          stdout=subprocess.PIPE)
        children.append(p1)
        assert p1.stdout is not None
        pushed = -1
        while pushed < n // 2:
            line = p1.stdout.readline().decode()
            assert line, "producer ended early"
            if line.startswith("pushed"):
                pushed = int(line.split()[1])
        p1.send_signal(signal.SIGKILL)
        p1.wait(5)
        # Core limitation (reported to the lead): a node restarted with the same id before the
        # hub noticed it gone is not always re-admitted; wait for presence to see it gone.
        wait_until(lambda: not hub.who_offers("queue", queue), timeout=10, what="producer gone")
        p2 = python_child(CHILD, "producer", str(pdir), mesh_name, ctrl(hub), queue, str(n),
                          stdout=subprocess.PIPE)
        children.append(p2)
        assert p2.stdout is not None
        first = p2.stdout.readline().decode().split()
        assert first[0] == "started" and int(first[1]) > pushed

        def all_seen() -> bool:
            with lock:
                return len(seen) >= n

        wait_until(all_seen, timeout=30, what="every pushed task processed")
        with lock:
            missing = set(range(n)) - seen
        assert not missing, f"{len(missing)} tasks never processed, e.g. {sorted(missing)[:5]}"
    finally:
        stop.set()
        th.join(5)


def test_always_raising_task_reaches_dlq_with_history_and_redrive(
    tmp_path: Path, hub: Node, mesh_name: str
) -> None:
    queue = unique("q")
    bo = Backoff(base=0.05, factor=2.0, cap=0.2)
    cfg = DispatchConfig(ack_wait=5.0, max_deliveries=4, backoff=bo)
    wnode = make_node(tmp_path / "wn", mesh_name, "wn", ctrl(hub))
    fail = True

    def handler(task: Task) -> None:
        if fail:
            raise ValueError(f"bad task {task.payload!r}")

    stop = threading.Event()
    try:
        with WorkQueue(hub, queue, config=cfg, seed=3) as q, Worker(wnode, queue, credit=5) as w:
            th = threading.Thread(target=w.run, args=(handler,), kwargs={"stop": stop})
            th.start()
            tid = q.push(b"payload-\x00\xff", key="k1")
            entries = wait_until(lambda: q.dlq.list(), timeout=10, what="dead letter")
            e = entries[0]
            assert e.task_id == tid and e.payload == b"payload-\x00\xff" and e.key == "k1"
            assert e.reason == "max_deliveries" and e.deliveries == 4 and e.queue == queue
            assert e.error_type == "ValueError" and "bad task" in (e.error_message or "")
            assert e.traceback and "ValueError" in e.traceback
            assert [a.outcome for a in e.history] == ["nack"] * 4
            assert [a.delivery for a in e.history] == [1, 2, 3, 4]
            for i in range(3):
                gap = e.history[i + 1].dispatched_at - e.history[i].ended_at
                # Full jitter: within [0, bound]; slack for scheduling on a busy machine.
                assert -0.01 <= gap <= bo.bound(i + 1) + 0.15, (i, gap)
            fail = False
            red = q.dlq.redrive(e.offset)
            assert red.status == "redriven"
            wait_until(lambda: q.stats().get("acked") == 1, timeout=10, what="redriven ack")
            shown = q.dlq.show(e.offset)
            assert shown.status == "redriven" and shown.ops[-1]["task_id"] > tid
            assert q.dlq.list() == []
            stop.set()
            th.join(5)
    finally:
        stop.set()
        wnode.close()


def test_poison_task_that_kills_its_worker_is_dead_lettered(
    tmp_path: Path, hub: Node, mesh_name: str, children: list[subprocess.Popen[bytes]]
) -> None:
    queue = unique("q")
    cfg = DispatchConfig(ack_wait=3.0, max_deliveries=3)
    with WorkQueue(hub, queue, config=cfg) as q:
        # Credit 5: tasks held beside the poison die with it, then are quarantined (one per
        # idle worker), so only the poison reaches the DLQ.
        alive = [spawn_worker(children, tmp_path, mesh_name, ctrl(hub), queue, 5, "poison")
                 for _ in range(2)]
        q.push_many([b"ok"] * 20)
        q.push(b"poison")
        q.push_many([b"ok"] * 20)
        deadline = time.monotonic() + 40
        while not q.dlq.list() and time.monotonic() < deadline:
            for i, p in enumerate(alive):
                if p.poll() is not None:
                    alive[i] = spawn_worker(children, tmp_path, mesh_name, ctrl(hub), queue, 5,
                                            "poison")
            time.sleep(0.02)  # poll interval of the respawn loop
        entries = q.dlq.list()
        assert len(entries) == 1 and entries[0].payload == b"poison"
        assert entries[0].deliveries == 3
        assert all(a.outcome in ("worker_gone", "timeout") for a in entries[0].history)
        q.wait_idle(timeout=15)
        assert q.stats()["acked"] == 40


def test_slow_credit_1_and_fast_credit_100(tmp_path: Path, hub: Node, mesh_name: str) -> None:
    queue = unique("q")
    n = 600
    counts = {"slow": 0, "fast": 0}
    max_held = {"slow": 0, "fast": 0}
    stop = threading.Event()
    nodes = [make_node(tmp_path / nm, mesh_name, nm, ctrl(hub)) for nm in ("slow", "fast")]

    def run(node: Node, name: str, credit: int, work_s: float) -> None:
        with Worker(node, queue, credit=credit) as w:
            while not stop.is_set():
                task = w.get(timeout=0.1)
                if task is None:
                    continue
                held = w.stats()["held"]
                max_held[name] = max(max_held[name], held)
                if work_s:
                    time.sleep(work_s)  # simulated slow work, not a wait for an outcome
                counts[name] += 1
                task.ack()

    try:
        with WorkQueue(hub, queue) as q:
            ths = [threading.Thread(target=run, args=(nodes[0], "slow", 1, 0.02)),
                   threading.Thread(target=run, args=(nodes[1], "fast", 100, 0.0))]
            for th in ths:
                th.start()
            wait_until(lambda: q.stats().get("workers") == 2, timeout=10, what="2 workers")
            q.push_many([b"x"] * n)
            q.wait_idle(timeout=20)
            stop.set()
            for th in ths:
                th.join(5)
            assert counts["slow"] + counts["fast"] == n
            assert counts["fast"] > 0.8 * n, counts
            assert max_held["slow"] == 1, max_held  # nothing ever waited in its buffer
            assert max_held["fast"] <= 100
    finally:
        stop.set()
        for nd in nodes:
            nd.close()


def test_malformed_frames_and_forged_acks_are_ignored_and_counted(
    tmp_path: Path, hub: Node, mesh_name: str
) -> None:
    queue = unique("q")
    wnode = make_node(tmp_path / "wn", mesh_name, "wn", ctrl(hub))
    ctx: zmq.Context[Any] = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.IDENTITY, b"evil")
    evil.setsockopt(zmq.LINGER, 0)
    try:
        with WorkQueue(hub, queue, config=DispatchConfig(ack_wait=5.0)) as q, \
                Worker(wnode, queue, credit=1) as w:
            ep = next(e for e in q.endpoints if e.startswith("tcp://"))
            evil.connect(ep)
            q.push(b"real")
            task = wait_until(lambda: w.get(timeout=0.05), timeout=10, what="task")
            garbage: list[list[bytes]] = [
                [b"junk"], [b"\x01\x03", b"\xc1"], [b"\x09\x03", msgpack.packb([0])],
                [b"\x01\x02", msgpack.packb([[0, 1, 1, None, b"x"]])],  # TASK to a producer
                [b"\x01\x01", msgpack.packb(["other-queue", 5, "n", "evil"])],
            ]
            for frames in garbage:
                evil.send_multipart(frames)
            evil.send_multipart(fr.encode_ids(fr.ACK, [task.id]))  # unknown worker
            evil.send_multipart(fr.encode_ready(fr.Ready(queue, 0, "nobody", "evil")))
            evil.send_multipart(fr.encode_ids(fr.ACK, [task.id, 10**9]))  # never got it; unknown
            wait_until(lambda: q.stats().get("malformed_frames", 0) >= 5, timeout=5,
                       what="malformed counted")
            wait_until(lambda: q.stats().get("forged_acks", 0) >= 3, timeout=5,
                       what="forged counted")
            assert q.stats()["acked"] == 0  # the forged acks did not end the task
            task.ack()
            w.flush()
            wait_until(lambda: q.stats().get("acked") == 1, timeout=5, what="real ack")
            assert q.stats()["forged_acks"] == 3
    finally:
        evil.close(0)
        ctx.term()
        wnode.close()


def test_role_name_and_push_validation(hub: Node) -> None:
    from mesh.errors import ClosedError, ConfigError

    queue = unique("q")
    assert role_for(queue) == f"pipe.{queue}"
    q = WorkQueue(hub, queue)
    with pytest.raises(ConfigError):
        q.push("text")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        q.push(b"x", key=5)  # type: ignore[arg-type]
    q.close()
    with pytest.raises(ClosedError):
        q.push(b"x")
    assert os.path.isdir(pipeline_root(hub.data_dir).path_for(f"{queue}.tasks"))


def test_two_producers_and_two_workers_share_one_queue(
    tmp_path: Path, hub: Node, mesh_name: str, children: list[subprocess.Popen[bytes]]
) -> None:
    queue = unique("q")
    other = make_node(tmp_path / "p2", mesh_name, "p2", ctrl(hub))
    try:
        with WorkQueue(hub, queue) as q1, WorkQueue(other, queue) as q2:
            for _ in range(2):
                spawn_worker(children, tmp_path, mesh_name, ctrl(hub), queue, 10, "ack")
            # Each worker finds both producers (the second one through gossip from the hub).
            for q in (q1, q2):
                wait_until(lambda q=q: q.stats().get("workers") == 2, timeout=10,  # type: ignore[misc]
                           what="both workers registered")
            q1.push_many([b"a"] * 300)
            q2.push_many([b"b"] * 300)
            q1.wait_idle(timeout=20)
            q2.wait_idle(timeout=20)
            assert q1.stats()["acked"] == 300 and q2.stats()["acked"] == 300
    finally:
        other.close()


def test_per_key_ordering_and_in_progress_over_tcp(
    tmp_path: Path, hub: Node, mesh_name: str
) -> None:
    queue = unique("q")
    # tcp only on the worker side: the same protocol over tcp instead of ipc.
    nodes = [Node(data_dir=tmp_path / f"k{i}", name=f"k{i}", mesh=mesh_name,
                  interface="127.0.0.1", mdns=False, presence=PRESENCE, transports=("tcp",),
                  static_peers=(ctrl(hub),)) for i in range(2)]
    order: dict[str, list[int]] = {"a": [], "b": []}
    busy: dict[str, int] = {"a": 0, "b": 0}
    overlaps = []
    lock = threading.Lock()
    stop = threading.Event()

    def run(node: Node) -> None:
        # Credit 1: a task buffered behind the long one would (rightly) time out meanwhile.
        with Worker(node, queue, credit=1) as w:
            while not stop.is_set():
                task = w.get(timeout=0.05)
                if task is None:
                    continue
                key = str(task.key)
                with lock:
                    busy[key] += 1
                    if busy[key] > 1:
                        overlaps.append(task.id)
                    order[key].append(int(task.payload))
                if int(task.payload) == 3:
                    # Longer than ack_wait (0.5 s) in total, kept alive by in_progress.
                    for _ in range(4):
                        task.in_progress()
                        stop.wait(0.2)  # simulated long work between heartbeats
                with lock:
                    busy[key] -= 1
                task.ack()
                w.flush()

    try:
        cfg = DispatchConfig(ack_wait=0.5, per_key_ordering=True)
        with WorkQueue(hub, queue, config=cfg) as q:
            ths = [threading.Thread(target=run, args=(nd,)) for nd in nodes]
            for th in ths:
                th.start()
            wait_until(lambda: q.stats().get("workers") == 2, timeout=10, what="2 workers")
            for i in range(60):
                q.push(str(i).encode(), key="a" if i % 2 == 0 else "b")
            q.wait_idle(timeout=20)
            stop.set()
            for th in ths:
                th.join(5)
            s = q.stats()
            assert s["acked"] == 60 and s["timeouts"] == 0 and s["in_progress"] >= 4
            assert order["a"] == list(range(0, 60, 2)) and order["b"] == list(range(1, 60, 2))
            assert overlaps == []
    finally:
        stop.set()
        for nd in nodes:
            nd.close()
