"""Reply cache by request id (pure: an injected clock; no I/O).

No double execution: the first copy of a request id starts a task (``RUNNING``); a copy that
arrives while it runs is attached to it (its sender gets the same reply); a copy that arrives
after it finished gets the stored reply for ``window`` seconds. Entries are dropped oldest-first
once the window passed, or when more than ``max_entries`` finished replies are held.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mesh.errors import ConfigError

__all__ = ["Lookup", "ReplyCache"]

R = TypeVar("R")  # what a finished entry stores (the encoded reply frames)
W = TypeVar("W")  # who waits on a running entry (client routing ids)


class Lookup(enum.Enum):
    """What :meth:`ReplyCache.begin` decided."""

    NEW = "new"  #: run it
    ATTACHED = "attached"  #: already running: the waiter was added
    CACHED = "cached"  #: finished: send the stored reply


@dataclass
class _Entry(Generic[R, W]):
    waiters: list[W] = field(default_factory=list)
    reply: R | None = None
    done_at: float = 0.0


class ReplyCache(Generic[R, W]):
    """Running and finished requests by id.

    Args:
        window: seconds a finished reply is kept.
        max_entries: most finished replies kept (the oldest are dropped first).
        clock: monotonic clock.

    Raises:
        ConfigError: window or max_entries not positive.
    """

    def __init__(self, window: float, max_entries: int, clock: Callable[[], float]) -> None:
        if not window > 0 or max_entries < 1:
            raise ConfigError(f"cache window and size must be positive, got {window}, {max_entries}")
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._running: dict[str, _Entry[R, W]] = {}
        self._done: collections.OrderedDict[str, _Entry[R, W]] = collections.OrderedDict()
        self.hits = 0
        self.attached = 0

    def begin(self, request_id: str, waiter: W) -> tuple[Lookup, R | None]:
        """Record an incoming copy of ``request_id`` from ``waiter``.

        Returns:
            ``(NEW, None)``: start it. ``(ATTACHED, None)``: it runs; the waiter will get the
            reply from :meth:`finish`. ``(CACHED, reply)``: send ``reply`` to the waiter.
        """
        self.expire()
        running = self._running.get(request_id)
        if running is not None:
            if waiter not in running.waiters:
                running.waiters.append(waiter)
            self.attached += 1
            return Lookup.ATTACHED, None
        done = self._done.get(request_id)
        if done is not None:
            self.hits += 1
            return Lookup.CACHED, done.reply
        self._running[request_id] = _Entry(waiters=[waiter])
        return Lookup.NEW, None

    def state(self, request_id: str) -> Lookup | None:
        """NEW-less view for pings: ATTACHED (running), CACHED (finished) or None (unknown)."""
        if request_id in self._running:
            return Lookup.ATTACHED
        done = self._done.get(request_id)
        if done is not None and self._clock() - done.done_at < self.window:
            return Lookup.CACHED
        return None

    def finish(self, request_id: str, reply: R, *, keep: bool = True) -> list[W]:
        """Store the reply (unless ``keep`` is False) and return every waiter to send it to."""
        entry = self._running.pop(request_id, None)
        if entry is None:
            return []
        if keep:
            entry.reply = reply
            entry.done_at = self._clock()
            self._done[request_id] = entry
            self._done.move_to_end(request_id)
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)
        waiters, entry.waiters = entry.waiters, []
        return waiters

    def expire(self) -> int:
        """Drop finished replies older than the window; return how many were dropped."""
        limit = self._clock() - self.window
        n = 0
        while self._done:
            key, entry = next(iter(self._done.items()))
            if entry.done_at > limit:
                break
            del self._done[key]
            n += 1
        return n

    @property
    def running(self) -> int:
        """Requests started and not finished."""
        return len(self._running)

    def __len__(self) -> int:
        return len(self._done)
