"""asyncio work queue: a producer and a decorator-style async worker on one node.

Run: python -m examples.pipeline_async
"""

from __future__ import annotations

import asyncio
import tempfile

from mesh.node import Node
from patterns.pipeline import AsyncWorker, AsyncWorkQueue, Task, TaskTerminated


async def main() -> None:
    with Node(data_dir=tempfile.mkdtemp(prefix="resize-"), mesh="resize-demo",
              interface="127.0.0.1", mdns=False) as node:
        async with AsyncWorkQueue(node, "resize") as q, AsyncWorker(node, "resize", credit=20) as w:

            @w.handler
            async def resize(task: Task) -> None:
                if task.payload == b"huge.png":
                    raise TaskTerminated("image too large")  # straight to the DLQ
                await asyncio.sleep(0)  # real work would await I/O here
                print("resized", task.payload.decode())

            for name in ("a.png", "b.png", "huge.png"):
                await q.push(name.encode())
            stop = asyncio.Event()
            runner = asyncio.create_task(w.run(stop=stop))
            await q.wait_idle(timeout=10)
            stop.set()
            await runner
            for e in q.dlq.list():
                print("dead letter:", e.payload, e.reason, e.error_message)


if __name__ == "__main__":
    asyncio.run(main())
