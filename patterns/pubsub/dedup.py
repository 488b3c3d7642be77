"""Idempotent consumption: remember the last N event ids and say which ones are new."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from mesh.errors import ConfigError

__all__ = ["Dedup"]


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


class Dedup:
    """A bounded window of recently seen event ids (insertion order, oldest evicted first).

    Pub/sub delivers at least once across subscriber restarts (the cursor is committed after
    the handler); a handler that must not act twice wraps its input with this window::

        dedup = Dedup(window=100_000)
        for event in sub:
            if dedup.first_time(event.id):
                handle(event)

    Args:
        window: how many ids to remember. A duplicate older than the window is not caught;
            size it above the events that can be redelivered after a crash (the events between
            two cursor commits).

    Raises:
        ConfigError: ``window`` is not positive.
    """

    def __init__(self, window: int = 100_000) -> None:
        if window <= 0:
            raise ConfigError(f"dedup window must be positive, got {window}")
        self.window = window
        # A dict is an insertion-ordered set with O(1) eviction of the oldest key.
        self._seen: dict[str, None] = {}
        self.duplicates = 0

    def first_time(self, event_id: str) -> bool:
        """Record ``event_id``; True if it was not in the window (act on it), else False."""
        seen = self._seen
        if event_id in seen:
            self.duplicates += 1
            return False
        seen[event_id] = None
        if len(seen) > self.window:
            del seen[next(iter(seen))]
        return True

    def filter(self, events: Iterable[_HasId]) -> Iterator[_HasId]:
        """Yield only the events whose id was not seen in the window."""
        for ev in events:
            if self.first_time(ev.id):
                yield ev

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)
