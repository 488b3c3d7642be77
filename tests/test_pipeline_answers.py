"""Worker answers leave promptly and safely: a slow handler's acks do not wait for the local
buffer to empty, and tasks ended from other threads (a thread pool) are acked exactly once.

Real nodes, real sockets, a real producer journal."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.errors import ClosedError, ConfigError
from mesh.node import Node
from patterns.pipeline.aio import AsyncWorker
from patterns.pipeline.dispatch import DispatchConfig
from patterns.pipeline.queue import WorkQueue
from patterns.pipeline.worker import Task, Worker
from tests.test_pipeline_real import ctrl, journal_acks, make_node
from tests.util import poll_until, unique, wait_until


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    mesh = unique("pa")
    hub = make_node(tmp_path / "hub", mesh, "hub")
    wnode = make_node(tmp_path / "w", mesh, "w", ctrl(hub))
    yield hub, wnode
    wnode.close()
    hub.close()


def _run_in_thread(target: Callable[..., object], *args: object,
                   **kwargs: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    t.start()
    return t


def test_slow_handler_acks_leave_before_the_buffer_empties(pair: tuple[Node, Node]) -> None:
    # Credit 10 and a 0.2 s handler: the buffer empties only after 2 s. Each ack must reach
    # the producer while later tasks are still buffered (before the next handler is done),
    # not when the buffer is empty (then tasks acked in time pass ack_wait and run again).
    hub, wnode = pair
    queue = unique("q")
    n = 10
    cfg = DispatchConfig(ack_wait=6.0, max_deliveries=5)
    stop = threading.Event()
    with WorkQueue(hub, queue, config=cfg) as q, Worker(wnode, queue, credit=n) as w:
        calls: list[int] = []
        late: list[tuple[int, int]] = []

        def handler(task: Task) -> None:
            k = len(calls)
            calls.append(task.id)
            # The k tasks handled before this one are acked at the producer within 0.25 s.
            if poll_until(lambda: q.stats().get("acked", 0) >= k, timeout=0.25) is None:
                late.append((k, q.stats().get("acked", 0)))
            time.sleep(0.2)  # simulated work

        t = _run_in_thread(w.run, handler, stop=stop)
        try:
            wait_until(lambda: q.stats().get("workers") == 1, timeout=10, what="worker ready")
            q.push_many([f"t{i}".encode() for i in range(n)])
            q.wait_idle(timeout=15)
            s = q.stats()
            assert s["acked"] == n and s["timeouts"] == 0 and s["redelivered"] == 0, s
            assert late == [], f"acks held in the worker: (handled, acked at producer) {late}"
        finally:
            stop.set()
            t.join(5)
    assert sorted(journal_acks(hub.data_dir, queue)) == list(range(n))


def test_ack_from_another_thread_wakes_the_owner(pair: tuple[Node, Node]) -> None:
    # The owner waits in get() (ready_interval 5 s: no periodic wake-up); an ack given on
    # another thread must reach the producer at once, not at the owner's next poll timeout.
    hub, wnode = pair
    queue = unique("q")
    with WorkQueue(hub, queue) as q, Worker(wnode, queue, credit=4, ready_interval=5.0) as w:
        got: list[Task] = []
        stop = threading.Event()
        blocking = threading.Event()  # set as the owner enters its 3 s get()

        def owner() -> None:
            while not stop.is_set():
                if got:
                    blocking.set()
                task = w.get(timeout=0.05) if not got else w.get(timeout=3.0)
                if task is not None:
                    got.append(task)

        t = _run_in_thread(owner)
        try:
            wait_until(lambda: q.stats().get("workers") == 1, timeout=10, what="worker ready")
            q.push(b"x")
            wait_until(lambda: got, timeout=5, what="task delivered")
            wait_until(blocking.is_set, timeout=5, what="the owner in its 3 s get()")
            started = time.monotonic()
            other = _run_in_thread(got[0].ack)
            other.join(5)
            wait_until(lambda: q.stats().get("acked") == 1, timeout=1.0,
                       what="ack from another thread sent promptly")
            assert time.monotonic() - started < 1.0
            with pytest.raises(ConfigError):
                got[0].ack()  # ended once only, whichever thread tries again
        finally:
            stop.set()
            t.join(5)


@pytest.mark.parametrize("style", ["iterate", "future"])
def test_thread_pool_handler_every_task_acked_exactly_once(
    pair: tuple[Node, Node], style: str
) -> None:
    hub, wnode = pair
    queue = unique("q")
    n = 3000
    cfg = DispatchConfig(ack_wait=3.0, max_deliveries=5)
    seen: dict[int, int] = {}
    seen_lock = threading.Lock()
    rng = random.Random(7)

    def work(task: Task) -> None:
        if rng.random() < 0.05:
            os.sched_yield()  # some tasks let the other pool threads go first: out of order
        with seen_lock:
            seen[task.id] = seen.get(task.id, 0) + 1

    def work_and_ack(task: Task) -> None:
        work(task)
        task.ack()

    stop = threading.Event()
    with WorkQueue(hub, queue, config=cfg) as q, Worker(wnode, queue, credit=64) as w, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:

        def iterate() -> None:
            while not stop.is_set():
                task = w.get(timeout=0.05)
                if task is not None:
                    pool.submit(work_and_ack, task)

        if style == "iterate":
            t = _run_in_thread(iterate)
        else:
            t = _run_in_thread(w.run, lambda task: pool.submit(work, task), stop=stop)
        try:
            wait_until(lambda: q.stats().get("workers") == 1, timeout=10, what="worker ready")
            started = time.monotonic()
            for base in range(0, n, 500):
                q.push_many([f"t{i}".encode() for i in range(base, base + 500)])
            q.wait_idle(timeout=30)
            elapsed = time.monotonic() - started
            s = q.stats()
            assert s["acked"] == n and s["redelivered"] == 0 and s["timeouts"] == 0, s
            assert s["stale_answers"] == 0 and s["forged_acks"] == 0, s
            assert n / elapsed > 1000, f"{n / elapsed:.0f} tasks/s"
        finally:
            stop.set()
            t.join(5)
    assert sorted(journal_acks(hub.data_dir, queue)) == list(range(n))
    assert len(seen) == n and set(seen.values()) == {1}


def test_async_worker_is_woken_by_an_ack_from_an_executor_thread(
    pair: tuple[Node, Node],
) -> None:
    hub, wnode = pair
    queue = unique("q")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with WorkQueue(hub, queue) as q:
            async with AsyncWorker(wnode, queue, credit=4, ready_interval=5.0) as w:
                first = asyncio.create_task(w.get(timeout=10))  # connects, sends READY
                await loop.run_in_executor(None, lambda: wait_until(
                    lambda: q.stats().get("workers") == 1, timeout=10, what="worker ready"))
                q.push(b"x")
                task = await first
                assert task is not None
                waiting = asyncio.create_task(w.get(timeout=3.0))  # blocks on the loop
                await asyncio.sleep(0.05)  # let it reach its wait (not a wait for an outcome)
                started = loop.time()
                await loop.run_in_executor(None, task.ack)
                await loop.run_in_executor(None, lambda: wait_until(
                    lambda: q.stats().get("acked") == 1, timeout=0.25,
                    what="ack from an executor thread sent by the loop promptly"))
                assert loop.time() - started < 0.25  # (it took 0.5 s before the wake-up pipe)
                waiting.cancel()

    asyncio.run(main())


def test_close_from_another_thread_wakes_the_blocked_owner(pair: tuple[Node, Node]) -> None:
    hub, wnode = pair
    queue = unique("q")
    with WorkQueue(hub, queue) as q:
        w = Worker(wnode, queue, credit=4, ready_interval=5.0)
        raised: list[BaseException] = []
        blocked = threading.Event()

        def owner() -> None:
            try:
                w.get(timeout=0.05)  # connects and registers
                blocked.set()
                w.get(timeout=10.0)
            except ClosedError as exc:
                raised.append(exc)

        t = _run_in_thread(owner)
        wait_until(lambda: q.stats().get("workers") == 1, timeout=10, what="worker ready")
        wait_until(blocked.is_set, timeout=5, what="owner waiting")
        started = time.monotonic()
        w.close()
        t.join(5)
        assert raised and time.monotonic() - started < 1.0
        assert not w._pipe_open  # the owner closed the wake-up pipe
