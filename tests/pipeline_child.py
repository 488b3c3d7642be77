"""Child processes for the pipeline tests (really SIGKILLed by them).

Usage: ``python -c "import tests.pipeline_child as c; c.main()" ROLE ARGS...``

* ``worker DATA_DIR MESH PEER QUEUE CREDIT BEHAVIOUR``: a node + Worker. BEHAVIOUR is ``ack``
  (ack all), ``slow`` (3 ms of work, then ack), ``hold`` (take tasks, never end them),
  ``raise`` (always raise ValueError), or ``poison`` (SIGKILL itself on the payload
  ``b"poison"``, ack the rest). Prints ``acked <id>`` lines (flushed per batch).
* ``producer DATA_DIR MESH PEER QUEUE N``: a node + WorkQueue pushing tasks ``0..N-1`` (those
  not already in its log) in batches of 50, printing ``pushed <last id>`` after each returned;
  then ``idle`` once every task is acked, and keeps running until killed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mesh.node import Node, PresenceConfig
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.worker import Task, Worker

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


def _node(data_dir: str, mesh: str, peer: str, name: str) -> Node:
    return Node(data_dir=data_dir, name=name, mesh=mesh, interface="127.0.0.1", mdns=False,
                presence=PRESENCE, static_peers=(peer,))


def worker(data_dir: str, mesh: str, peer: str, queue: str, credit: str, behaviour: str) -> None:
    node = _node(data_dir, mesh, peer, f"w{os.getpid()}")
    with Worker(node, queue, credit=int(credit)) as w:
        while True:
            task: Task | None = w.get(timeout=0.2)
            if task is None:
                continue
            if behaviour == "hold":
                sys.stdout.write(f"got {task.id}\n")
                continue
            if behaviour == "raise":
                try:
                    raise ValueError(f"cannot process task {task.id}")
                except ValueError as exc:
                    task.nack(error=exc)
                continue
            if behaviour == "poison" and task.payload == b"poison":
                w.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if behaviour == "slow":
                time.sleep(0.003)  # simulated work, so kills land mid-run
            task.ack()
            sys.stdout.write(f"acked {task.id}\n")


def producer(data_dir: str, mesh: str, peer: str, queue: str, n: str) -> None:
    node = _node(data_dir, mesh, peer, "producer")
    total = int(n)
    cfg = DispatchConfig(ack_wait=2.0, max_deliveries=20)
    with WorkQueue(node, queue, config=cfg) as q:
        start = q._store.tasks.next_offset
        sys.stdout.write(f"started {start} recovered {q.recovered}\n")
        for base in range(start, total, 50):
            ids = q.push_many([f"task-{i}".encode() for i in range(base, min(base + 50, total))])
            sys.stdout.write(f"pushed {ids[-1]}\n")
            sys.stdout.flush()
            time.sleep(0.002)  # pace the pushes so a kill lands mid-run
        while q.stats().get("unacked", 1) != 0:
            time.sleep(0.02)  # poll interval on the queue's snapshot
        sys.stdout.write("idle\n")
        sys.stdout.flush()
        while True:
            time.sleep(1)  # stay up until the test kills us


def main() -> None:
    role, *args = sys.argv[1:]
    {"worker": worker, "producer": producer}[role](*args)


if __name__ == "__main__":
    main()
