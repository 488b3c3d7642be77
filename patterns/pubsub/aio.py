"""asyncio twins: ``async for event in AsyncSubscriber(...)`` and ``await pub.publish(...)``.

The hot path stays on plain sockets (measured: one await per message is ~15x
slower). :class:`AsyncSubscriber` runs the sync subscriber's blocking receive in the loop's
own single worker thread (the sync subscriber's owner) and hands back a *batch* (up to ``batch`` events) per hop, so the thread hop
costs once per batch, then yields the batch's events one by one without awaiting.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.envelope import Event
from mesh.errors import ClosedError, ReplicationTimeout
from mesh.tracing import use_event
from patterns.pubsub.publisher import Publisher, _no_replica_wait
from patterns.pubsub.subscriber import Subscriber

__all__ = ["AsyncPublisher", "AsyncSubscriber"]


class AsyncSubscriber:
    """Async iterator over a :class:`Subscriber` (same arguments, same delivery guarantees).

    Example::

        async with AsyncSubscriber(node, "sensors.", durable="agg") as sub:
            async for event in sub:
                await handle(event)

    An event counts as processed when the next one is asked for (as with the sync iterator).
    Leaving ``async with`` by an exception commits nothing past the last event fully handled
    (the failing one comes again after a restart). Cancelling a ``recv()`` (e.g.
    ``asyncio.wait_for(sub.recv(), 0.05)``) loses nothing: the receive already under way in
    the worker thread keeps its batch, and the next ``recv()`` takes it.

    Threading: the blocking receives run on one dedicated thread of this object (the sync
    subscriber's owner thread, see :class:`Subscriber`); use the object from one event loop.

    Args:
        *args: as :class:`Subscriber`.
        batch: most events handed over per executor hop.
        **kwargs: as :class:`Subscriber`.

    Raises:
        ConfigError: bad arguments (from :class:`Subscriber`).
    """

    def __init__(self, *args: Any, batch: int = 1000, **kwargs: Any) -> None:
        self.sync = Subscriber(*args, **kwargs)
        self._batch = batch
        # Raw ready items taken from the sync subscriber, not handed out yet, and the one
        # handed out last (processed once the next is asked for).
        # Ready items taken from the subscriber: runs (key, first seq, [events]) and marks;
        # _off events of the run at the head were handed out already.
        self._pending: collections.deque[Any] = collections.deque()
        self._off = 0
        self._cur: Any = None
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="zeromesh-asub")
        self._fut: asyncio.Future[list[Any]] | None = None  # the receive under way

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Event:
        ev = await self.recv()
        if ev is None:
            raise StopAsyncIteration
        # The loop body is this event's handler: what it publishes or requests inherits the
        # trace id, correlation and causation (the task's context, as the sync iterator's).
        use_event(ev)
        return ev

    def _hand_out(self) -> Event | None:
        """Mark the current event processed; the next pending event (markers passed)."""
        sync = self.sync
        pending = self._pending
        if self._cur is None and not pending:
            return None
        with sync._lock:
            positions = sync._positions
            cur = self._cur
            if cur is not None:
                self._cur = None
                positions[cur[0]] = cur[1] + 1
                sync._moves += 1  # a quiet stream commits soon (Subscriber._maybe_commit)
            while pending:
                key, first, run = pending[0]
                if run.__class__ is list:  # a run of events: one at a time, in order
                    off = self._off
                    ev: Event = run[off]
                    self._cur = (key, first + off, ev)
                    off += 1
                    if off == len(run):
                        pending.popleft()
                        off = 0
                    self._off = off
                    return ev
                pending.popleft()
                sync._reach(key, run)  # a mark (gap, skipped event): applied in order
        return None

    async def recv(self, timeout: float | None = None) -> Event | None:
        """The next event; None when closed or after ``timeout`` seconds.

        Raises:
            StreamGap: a gap whose policy is "error" (``on_gap``/``on_retention``).
        """
        ev = self._hand_out()
        if ev is not None:
            return ev
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self.sync.closed:
                return None
            fut = self._fut
            if fut is None:
                # Short blocking waits so close() and cancellation are noticed promptly.
                wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - loop.time()))
                fut = self._fut = loop.run_in_executor(self._exec, self.sync._recv_items, wait,
                                                       self._batch)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            # asyncio.wait neither cancels ``fut`` on timeout nor when this task is
            # cancelled: its batch stays in self._fut for the next recv().
            await asyncio.wait((fut,), timeout=left)
            if fut.done():
                self._fut = None
                try:
                    items = fut.result()
                except ClosedError:
                    return None
                self._pending.extend(items)
                ev = self._hand_out()
                if ev is not None:
                    return ev
            if deadline is not None and loop.time() >= deadline:
                return None

    async def commit(self) -> None:
        """Commit the position past every event handed out so far.

        Raises:
            StateError: the cursor store failed.
        """
        sync = self.sync
        with sync._lock:
            cur = self._cur
            if cur is not None:
                self._cur = None
                sync._positions[cur[0]] = cur[1] + 1
            sync._commit_positions()

    async def aclose(self) -> None:
        """Close the subscriber (commits with auto commit). Idempotent."""
        await self._close(failed=False)

    async def _close(self, *, failed: bool) -> None:
        sync = self.sync
        with sync._lock:
            cur = self._cur
            self._cur = None
            if cur is not None and not failed:
                sync._positions[cur[0]] = cur[1] + 1
        self._pending.clear()  # taken, never handed out: not committed, they come again
        self._off = 0
        fut, self._fut = self._fut, None
        if fut is not None:  # its batch is dropped uncommitted; its ClosedError is expected
            fut.add_done_callback(_retrieve)
        sync.close()
        self._exec.shutdown(wait=False)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, et: type[BaseException] | None, *exc: object) -> None:
        # Left by an exception: the event being handled failed; do not commit past it.
        await self._close(failed=et is not None)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" at GC


class AsyncPublisher:
    """Async face of :class:`Publisher` (same arguments).

    ``publish()`` appends to the log and sends without blocking on the network; with the default
    fsync policy (every 10 ms, in a background thread) it does not wait for the disk either, so
    it runs inline instead of paying a thread hop per event.

    Raises:
        ConfigError, LogError: as :class:`Publisher`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = Publisher(*args, **kwargs)

    async def publish(self, data: Any = None, **kwargs: Any) -> int:
        """Publish one event; returns its seq. Raises as :meth:`Publisher.publish`.

        With ``replicas`` the event is logged and sent at once, then the stores are awaited
        on the loop (no thread): an await cancelled while it waits has published the event
        (it is in the log and will replicate); only the wait is abandoned.
        """
        sync = self.sync
        if not sync.replicas:
            return sync.publish(data, **kwargs)
        token = _no_replica_wait.set(True)
        try:
            seq = sync.publish(data, **kwargs)
        finally:
            _no_replica_wait.reset(token)
        await self.wait_replicated(seq, sync.replica_timeout_s)
        return seq

    async def publish_many(self, items: Any, **kwargs: Any) -> range:
        """Publish many events; returns their seqs. Raises as :meth:`Publisher.publish_many`.

        With ``replicas``: as :meth:`publish` (published first, then the stores awaited)."""
        sync = self.sync
        if not sync.replicas:
            return sync.publish_many(items, **kwargs)
        token = _no_replica_wait.set(True)
        try:
            seqs = sync.publish_many(items, **kwargs)
        finally:
            _no_replica_wait.reset(token)
        if seqs:
            await self.wait_replicated(seqs[-1], sync.replica_timeout_s)
        return seqs

    async def wait_replicated(self, seq: int, timeout: float | None = None, *,
                              replicas: int | None = None) -> None:
        """:meth:`Publisher.wait_replicated` on the loop: woken by the replication acks, no
        thread blocked (a cancelled wait leaves nothing behind)."""
        sync = self.sync
        want = sync._replicas_wanted(replicas)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def check() -> None:
            if sync._held(seq) >= want or sync._closed:
                done.set()

        def wake() -> None:  # reactor thread (or a closing thread)
            try:
                loop.call_soon_threadsafe(check)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        hub = sync._hub
        hub.repl_watchers.add(wake)
        try:
            check()
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                pass
        finally:
            hub.repl_watchers.discard(wake)
        if sync._held(seq) < want:
            raise ReplicationTimeout(sync.stream, seq, want, sync._held(seq))

    async def aclose(self) -> None:
        """Close the publisher. Idempotent."""
        self.sync.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
