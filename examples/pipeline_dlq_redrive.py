"""A work pipeline with a dead-letter queue and redrive.

    python -m examples.pipeline_dlq_redrive

A producer pushes orders; the worker has a bug that makes it fail on one of them. The failing
task is retried with backoff, then dead-lettered after ``max_deliveries`` with its error and
retry history kept. After the "fix" is deployed, the dead letter is redriven: pushed back onto
the queue (the redrive is recorded in the DLQ's operations log) and processed successfully.
The same operations exist on the command line: ``mesh dlq list|show|redrive DIR QUEUE``.
"""

from __future__ import annotations

import tempfile
import time

from mesh.node import Node
from patterns.pipeline import Backoff, DispatchConfig, Task, Worker, WorkQueue

fixed = False  # the bug fix, "deployed" later


def process(task: Task) -> None:
    order = task.payload.decode()
    if order == "order-3" and not fixed:
        raise ValueError(f"cannot parse {order}")
    print(f"processed {order} (delivery {task.delivery})")


def drain(q: WorkQueue, w: Worker, timeout: float = 15.0) -> None:
    """Run the worker until the producer owes nothing (every task acked or dead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = w.get(timeout=0.1)
        if task is not None:
            w.handle(task, process)  # an exception is a nack, with the error kept
        elif q.stats().get("unacked", 1) == 0:
            w.flush()
            return
    raise SystemExit("queue did not drain")


def main(tmp: str) -> None:
    global fixed
    cfg = DispatchConfig(max_deliveries=3, backoff=Backoff(base=0.02, cap=0.1))
    with Node(data_dir=f"{tmp}/producer", interface="127.0.0.1", mdns=False) as pnode, \
            WorkQueue(pnode, "orders", config=cfg) as q:
        ep = pnode.info().endpoints["control"][0]
        with Node(data_dir=f"{tmp}/worker", interface="127.0.0.1", mdns=False,
                  static_peers=(ep,)) as wnode, Worker(wnode, "orders") as w:
            for i in range(1, 6):
                q.push(f"order-{i}".encode())
            drain(q, w)
            dead = q.dlq.list()
            for e in dead:
                print(f"dead letter: offset {e.offset}: {e.payload.decode()} "
                      f"{e.error_type}: {e.error_message} after {e.deliveries} deliveries")
            assert [e.payload for e in dead] == [b"order-3"]

            fixed = True  # deploy the fix, then redrive
            for e in dead:
                q.dlq.redrive(e.offset)
            drain(q, w)
            assert q.dlq.list() == [], "the redriven task is no longer pending in the DLQ"
            print("DLQ empty after redrive; operations:",
                  [op.get("op") for op in q.dlq.ops()])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
