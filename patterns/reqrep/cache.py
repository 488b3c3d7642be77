"""Reply cache by (caller, request id) (pure: an injected clock; no I/O).

No double execution: the first copy of a request starts a task (``RUNNING``); a copy that
arrives while it runs is attached to it (its sender gets the same reply); a copy that arrives
after it finished gets the stored reply for ``window`` seconds.

The key is the caller (who sent it, as the responder can tell: the CURVE-proven node id, or
the connection's routing id without security) *and* the request id, so one caller can never
get another caller's reply by reusing its id. Each entry keeps a digest of the request's
payload: a copy under the same key with another digest is a :attr:`Lookup.CONFLICT` (refused,
never run, never answered with the stored reply).

Entries are dropped oldest-first once the window passed, when more than ``max_entries``
finished replies are held, or when the finished replies' sizes add up to more than
``max_bytes``.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Hashable
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
    CONFLICT = "conflict"  #: same caller and id, another payload: refuse it


class _Entry(Generic[R, W]):
    # a plain class with slots: one is made per request (a dataclass with a default_factory
    # costs about twice as much to build)
    __slots__ = ("digest", "done_at", "reply", "size", "waiters")

    def __init__(self, digest: bytes, waiters: list[W] | None = None, reply: R | None = None,
                 done_at: float = 0.0, size: int = 0) -> None:
        self.digest = digest
        self.waiters: list[W] = [] if waiters is None else waiters
        self.reply = reply
        self.done_at = done_at
        self.size = size


class ReplyCache(Generic[R, W]):
    """Running and finished requests by (caller, id).

    Args:
        window: seconds a finished reply is kept.
        max_entries: most finished replies kept (the oldest are dropped first).
        clock: monotonic clock.
        max_bytes: most bytes of finished replies kept (sizes as given to :meth:`finish`).

    Raises:
        ConfigError: window, max_entries or max_bytes not positive.
    """

    def __init__(self, window: float, max_entries: int, clock: Callable[[], float], *,
                 max_bytes: int = 1 << 62) -> None:
        if not window > 0 or max_entries < 1 or max_bytes < 1:
            raise ConfigError(f"cache window and sizes must be positive, got {window}, "
                              f"{max_entries}, {max_bytes}")
        self.window = window
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._running: dict[Hashable, _Entry[R, W]] = {}
        self._done: collections.OrderedDict[Hashable, _Entry[R, W]] = collections.OrderedDict()
        self._bytes = 0
        self._calls = 0  # begin() calls since the last expire()
        self.hits = 0
        self.attached = 0
        self.conflicts = 0

    def begin(self, key: Hashable, waiter: W, digest: bytes = b"") -> tuple[Lookup, R | None]:
        """Record an incoming copy of the request ``key`` (caller, id) from ``waiter``.

        Returns:
            ``(NEW, None)``: start it. ``(ATTACHED, None)``: it runs; the waiter will get the
            reply from :meth:`finish`. ``(CACHED, reply)``: send ``reply`` to the waiter.
            ``(CONFLICT, None)``: the key is known with another payload ``digest``: refuse.
        """
        # Finished replies older than the window are dropped every 64 calls, not on each
        # (a clock read and an iterator per request); a hit is checked against the window.
        self._calls += 1
        if self._calls >= 64:
            self._calls = 0
            self.expire()
        running = self._running.get(key)
        if running is not None:
            if running.digest != digest:
                self.conflicts += 1
                return Lookup.CONFLICT, None
            if waiter not in running.waiters:
                running.waiters.append(waiter)
            self.attached += 1
            return Lookup.ATTACHED, None
        done = self._done.get(key)
        if done is not None and self._clock() - done.done_at >= self.window:
            self.expire()  # past the window: unknown (expire drops it, oldest first)
            done = self._done.pop(key, None)
            if done is not None:  # only if kept out of order: dropped all the same
                self._bytes -= done.size
                done = None
        if done is not None:
            if done.digest != digest:
                self.conflicts += 1
                return Lookup.CONFLICT, None
            self.hits += 1
            return Lookup.CACHED, done.reply
        self._running[key] = _Entry(digest, [waiter])
        return Lookup.NEW, None

    def restore(self, key: Hashable, digest: bytes, reply: R, done_at: float,
                size: int = 0) -> None:
        """Put back a finished entry (read from a durable outcome log at start); call in
        ``done_at`` order, oldest first, before any :meth:`begin`."""
        old = self._done.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._done[key] = _Entry(digest, reply=reply, done_at=done_at, size=size)
        self._bytes += size
        while self._done and (len(self._done) > self.max_entries
                              or self._bytes > self.max_bytes):
            _, dropped = self._done.popitem(last=False)
            self._bytes -= dropped.size

    def state(self, key: Hashable) -> Lookup | None:
        """NEW-less view for pings: ATTACHED (running), CACHED (finished) or None (unknown)."""
        if key in self._running:
            return Lookup.ATTACHED
        done = self._done.get(key)
        if done is not None and self._clock() - done.done_at < self.window:
            return Lookup.CACHED
        return None

    def finish(self, key: Hashable, reply: R, *, keep: bool = True, size: int = 0) -> list[W]:
        """Store the reply of ``size`` bytes (unless ``keep`` is False) and return every waiter
        to send it to."""
        entry = self._running.pop(key, None)
        if entry is None:
            return []
        if keep:
            entry.reply = reply
            entry.done_at = self._clock()
            entry.size = size
            old = self._done.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._done[key] = entry
            self._bytes += size
            while self._done and (len(self._done) > self.max_entries
                                  or self._bytes > self.max_bytes):
                _, dropped = self._done.popitem(last=False)
                self._bytes -= dropped.size
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
            self._bytes -= entry.size
            n += 1
        return n

    @property
    def running(self) -> int:
        """Requests started and not finished."""
        return len(self._running)

    @property
    def bytes(self) -> int:
        """Sum of the sizes of the finished replies held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._done)
