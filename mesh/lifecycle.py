"""What a Node closes before itself: the live patterns registered with ``Node.on_close``.

A pattern (queue, worker, service, client, publisher, subscriber) runs an I/O thread or
reactor callbacks on sockets made by its node. Closing the node under it used to close those
sockets from under the thread (``ZMQError ENOTSOCK`` tracebacks). Each pattern registers its
``close`` here; ``Node.close`` calls them first, newest first (a subscriber opened after a
publisher goes before it), while the reactor and the sockets still work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Closers"]

log = logging.getLogger(__name__)


class Closers:
    """An ordered set of close callbacks, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._closing = False

    def add(self, closer: Callable[[], None]) -> Callable[[], None]:
        """Register ``closer``; returns a function that unregisters it (idempotent).

        Once :meth:`close_all` ran it is not kept (the node is closing; making the pattern's
        sockets fails with ClosedError anyway).
        """
        with self._lock:
            if self._closing:
                return lambda: None
            key = self._next
            self._next += 1
            self._items[key] = closer

        def remove() -> None:
            with self._lock:
                self._items.pop(key, None)

        return remove

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def close_all(self, owner: str) -> None:
        """Call every registered closer, newest first; a failing one is logged, the rest run."""
        with self._lock:
            self._closing = True
            items = sorted(self._items.items(), reverse=True)
            self._items.clear()
        for _, closer in items:
            try:
                closer()
            except Exception:
                log.exception("node %s: closing %r failed", owner, closer)
