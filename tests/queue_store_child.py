"""Child process for the queue durability tests (really SIGKILLed by them).

Usage: ``python -c "import tests.queue_store_child as c; c.main()" DATA_DIR MESH QUEUE N WORK``

Opens a node with a :class:`WorkQueue` ``QUEUE`` and, when ``WORK`` is ``1``, a
:class:`Worker` of it on the same node that acks everything and prints ``acked <payload>``.
Prints ``stats <json>`` after the queue opened, pushes ``N`` tasks in batches of 50
(payloads ``<pid>-<i>``), prints ``pushed <first id> <last id>``, waits until they are all acked when
working (``idle``), and stays up until killed.
"""

from __future__ import annotations

import json
import os
import sys
import threading

from mesh.node import Node, PresenceConfig
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.worker import Worker

PRESENCE = PresenceConfig(heartbeat_s=0.1, evasive_s=0.3, gone_s=0.6)


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    data_dir, mesh, queue, n, work = sys.argv[1:6]
    node = Node(data_dir=data_dir, name="p", mesh=mesh, interface="127.0.0.1", mdns=False,
                presence=PRESENCE)
    opts = {"accept_loss": True} if os.environ.get("ACCEPT_LOSS") == "1" else {}
    q = WorkQueue(node, queue, config=DispatchConfig(ack_wait=5.0), **opts)
    s = q.stats()
    _print("stats " + json.dumps({k: s.get(k) for k in ("lost_tasks", "lost_ranges",
                                                        "stale_journal_facts")}
                                 | {"recovered": q.recovered}))

    def run() -> None:
        with Worker(node, queue, credit=50) as w:
            while True:
                task = w.get(timeout=0.2)
                if task is None:
                    continue
                task.ack()
                w.flush()
                _print(f"acked {task.payload.decode()}")

    if work == "1":
        threading.Thread(target=run, daemon=True).start()
    total = int(n)
    if total:
        ids = [i for b in range(0, total, 50)  # batches of 50: one log batch each
               for i in q.push_many([f"{os.getpid()}-{i}".encode()
                                     for i in range(b, min(b + 50, total))])]
        q._store.tasks.flush()
        _print(f"pushed {ids[0]} {ids[-1]}")
    if work == "1":
        q.wait_idle(timeout=60)
        q._store.journal.flush()
        _print("idle")
    threading.Event().wait()  # stay up until the test kills us


if __name__ == "__main__":
    main()
