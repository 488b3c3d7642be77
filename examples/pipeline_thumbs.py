"""A work queue with a producer and a worker on two nodes of one mesh (static peers, no mDNS).

Run: python -m examples.pipeline_thumbs
"""

from __future__ import annotations

import tempfile

from mesh.node import Node
from patterns.pipeline import Backoff, DispatchConfig, Task, Worker, WorkQueue


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="thumbs-")
    with Node(data_dir=f"{tmp}/producer", mesh="thumbs-demo", interface="127.0.0.1",
              mdns=False) as pnode:
        peer = next(e for e in pnode.info().endpoints["control"] if e.startswith("tcp://"))
        with Node(data_dir=f"{tmp}/worker", mesh="thumbs-demo", interface="127.0.0.1",
                  mdns=False, static_peers=(peer,)) as wnode:
            # Producer side: every push is in the queue's log before it returns.
            cfg = DispatchConfig(max_deliveries=3, backoff=Backoff(base=0.05, cap=0.2))
            with WorkQueue(pnode, "thumbs", config=cfg) as q:
                for name in ("cat.jpg", "dog.jpg", "broken.jpg"):
                    q.push(name.encode())

                # Worker side: an exception is a nack with the error kept (-> DLQ at the end).
                def make_thumbnail(task: Task) -> None:
                    if task.payload == b"broken.jpg":
                        raise ValueError("not a JPEG")
                    print("thumbnail of", task.payload.decode())

                with Worker(wnode, "thumbs", credit=10) as w:
                    while q.stats().get("unacked", 1):
                        task = w.get(timeout=0.2)
                        if task is not None:
                            w.handle(task, make_thumbnail)
                for e in q.dlq.list():
                    print("dead letter:", e.payload, e.error_type, e.error_message,
                          "after", e.deliveries, "deliveries")


if __name__ == "__main__":
    main()
