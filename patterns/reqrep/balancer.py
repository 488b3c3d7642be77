"""Choosing a responder by free capacity; tracking silent ones (pure; injected clock and RNG).

Each responder advertises its free handler slots in every REPLY and PONG. The client scores a
responder as ``advertised free - requests this client sent it since`` and picks the best score
(random among equals), so load follows capacity instead of blind round robin. A responder that
stayed silent past the liveness limit is skipped for ``silent_s`` seconds, or until it is heard
from again (a restarted responder re-announces itself and is used again at once).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

__all__ = ["Balancer", "ResponderView"]


@dataclass
class ResponderView:
    """What the client knows about one responder."""

    node_id: str
    free: int | None = None  #: free slots last advertised (None until heard)
    inflight: int = 0  #: requests of this client it holds
    last_heard: float = 0.0
    silent_until: float = 0.0

    def score(self, unheard: int = 1) -> int:
        """Higher is better. A responder not heard from yet counts as ``unheard`` free slots
        (the choice passes the best capacity heard from its peers, so a new responder ties
        with the best known one instead of always losing to it)."""
        return (unheard if self.free is None else self.free) - self.inflight


class Balancer:
    """The responders of one service name as seen by one client.

    Args:
        clock: monotonic clock.
        silent_s: how long a silent responder is skipped before it is tried again.
        rand: random source for tie breaks.
    """

    def __init__(self, clock: Callable[[], float], silent_s: float = 5.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._clock = clock
        self.silent_s = silent_s
        self._rand = rand
        self.responders: dict[str, ResponderView] = {}

    def add(self, node_id: str) -> None:
        """A responder appeared (or re-announced itself): use it, even if it was silent."""
        view = self.responders.get(node_id)
        if view is None:
            self.responders[node_id] = ResponderView(node_id, last_heard=self._clock())
        else:
            view.silent_until = 0.0

    def remove(self, node_id: str) -> None:
        """A responder left the mesh."""
        self.responders.pop(node_id, None)

    def heard(self, node_id: str, free: int | None = None) -> None:
        """Any frame from the responder: it is alive; note its advertised capacity."""
        view = self.responders.get(node_id)
        if view is None:
            return
        view.last_heard = self._clock()
        view.silent_until = 0.0
        if free is not None:
            view.free = free

    def mark_silent(self, node_id: str) -> None:
        """It did not answer within the liveness limit: skip it for a while."""
        view = self.responders.get(node_id)
        if view is not None:
            view.silent_until = self._clock() + self.silent_s

    def is_silent(self, node_id: str) -> bool:
        """True while the responder is being skipped."""
        view = self.responders.get(node_id)
        return view is not None and view.silent_until > self._clock()

    def started(self, node_id: str) -> ResponderView | None:
        """A request was sent to it; returns the view whose count was raised (give it to
        :meth:`finished`, so a responder that left and came back is not decremented for a
        request of its previous life)."""
        view = self.responders.get(node_id)
        if view is not None:
            view.inflight += 1
        return view

    def finished(self, node_id: str, view: ResponderView | None = None) -> None:
        """A request sent to it ended: replied, failed over, timed out, cancelled or closed
        (each call releases exactly once per send, see :meth:`Call.release`)."""
        current = self.responders.get(node_id)
        if view is not None and current is not view:
            return  # counted on a view that was removed since
        if current is not None and current.inflight > 0:
            current.inflight -= 1

    def choose(self, exclude: Collection[str] = ()) -> str | None:
        """The responder to send to: best score among the live ones not in ``exclude``; when
        all live ones are excluded, the best excluded one (retrying beats failing); None when
        none is live."""
        now = self._clock()
        if len(self.responders) == 1:  # the common deployment: no scoring to do
            for v in self.responders.values():
                return v.node_id if v.silent_until <= now else None
        live = [v for v in self.responders.values() if v.silent_until <= now]
        if not live:
            return None
        fresh = [v for v in live if v.node_id not in exclude] or live
        unheard = max((v.free for v in fresh if v.free is not None), default=1)
        scores = [(v.score(unheard), v) for v in fresh]
        best = max(sc for sc, _ in scores)
        ties = [v for sc, v in scores if sc == best]
        return ties[int(self._rand() * len(ties)) % len(ties)].node_id
