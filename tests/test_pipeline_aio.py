"""asyncio twins: an async producer and an async worker over real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh.node import Node
from patterns.pipeline.aio import AsyncWorker, AsyncWorkQueue
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.worker import Task
from tests.util import unique


def test_async_queue_and_worker_ack_nack(tmp_path: Path) -> None:
    async def main() -> None:
        queue = unique("q")
        cfg = DispatchConfig(max_deliveries=2)
        with Node(data_dir=tmp_path, mesh=unique("m"), interface="127.0.0.1", mdns=False) as node:
            async with AsyncWorkQueue(node, queue, config=cfg) as q, \
                    AsyncWorker(node, queue, credit=50) as w:
                await q.push_many([b"ok"] * 200)
                await q.push(b"bad")

                async def handler(task: Task) -> None:
                    if task.payload == b"bad":
                        raise KeyError("no such thing")

                stop = asyncio.Event()
                runner = asyncio.create_task(w.run(handler, stop=stop))
                await asyncio.wait_for(q.wait_idle(timeout=15), 20)
                stop.set()
                handled = await asyncio.wait_for(runner, 5)
                assert handled == 202  # 200 acks + 2 deliveries of the failing task
                s = q.stats()
                assert s["acked"] == 200 and s["dead_lettered"] == 1
                [dead] = q.dlq.list()
                assert dead.error_type == "KeyError" and dead.payload == b"bad"
                assert await w.get(timeout=0.05) is None

    asyncio.run(main())
