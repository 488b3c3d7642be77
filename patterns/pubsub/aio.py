"""asyncio twins: ``async for event in AsyncSubscriber(...)`` and ``await pub.publish(...)``.

The hot path stays on plain sockets (DESIGN.md, "Concurrency": one await per message is ~15x
slower). :class:`AsyncSubscriber` runs the sync subscriber's blocking receive in the loop's
default executor and hands back a *batch* (up to ``batch`` events) per hop, so the thread hop
costs once per batch, then yields the batch's events one by one without awaiting.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from mesh.envelope import Event
from mesh.tracing import use_event
from patterns.pubsub.publisher import Publisher
from patterns.pubsub.subscriber import Subscriber

__all__ = ["AsyncPublisher", "AsyncSubscriber"]


class AsyncSubscriber:
    """Async iterator over a :class:`Subscriber` (same arguments, same delivery guarantees).

    Example::

        async with AsyncSubscriber(node, "sensors.", durable="agg") as sub:
            async for event in sub:
                await handle(event)

    An event counts as processed when the next one is asked for (as with the sync iterator).

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
        self._pending: collections.deque[Event] = collections.deque()

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

    async def recv(self, timeout: float | None = None) -> Event | None:
        """The next event; None when closed or after ``timeout`` seconds.

        Raises:
            RetentionGap: with ``on_retention="error"``.
        """
        if self._pending:
            ev = self._pending.popleft()
            # Everything before the event returned now is processed.
            with self.sync._lock:
                self.sync._done(len(self._pending) + 1)
            return ev
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self.sync.closed:
                return None
            # Short blocking waits so close() and cancellation are noticed promptly.
            wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - loop.time()))
            batch = await loop.run_in_executor(None, self.sync._recv_batch_async, wait,
                                               self._batch)
            if batch:
                self._pending.extend(batch[1:])
                with self.sync._lock:
                    self.sync._done(len(self._pending) + 1)
                return batch[0]
            if deadline is not None and loop.time() >= deadline:
                return None

    async def commit(self) -> None:
        """Commit the position past every event handed out so far.

        Raises:
            StateError: the cursor store failed.
        """
        self.sync.commit_upto(len(self._pending))

    async def aclose(self) -> None:
        """Close the subscriber (commits with auto commit). Idempotent."""
        self.sync.close(unhanded=len(self._pending))
        self._pending.clear()

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
        """Publish one event; returns its seq. Raises as :meth:`Publisher.publish`."""
        return self.sync.publish(data, **kwargs)

    async def publish_many(self, items: Any, **kwargs: Any) -> range:
        """Publish many events; returns their seqs. Raises as :meth:`Publisher.publish_many`."""
        return self.sync.publish_many(items, **kwargs)

    async def aclose(self) -> None:
        """Close the publisher. Idempotent."""
        self.sync.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
