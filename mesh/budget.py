"""Budgets for what a remote peer can make this node hold, and rate-limited log lines.

One mechanism for every table, queue or buffer a peer can make grow (pure logic, no I/O):

- :class:`Budget` holds units (entries, bytes, links ...) per key (a peer: its node id, CURVE
  key or source address, whichever the connection proves) under two caps, one per key and one
  for the node. ``take`` is refused, and counted, when either cap would be passed; ``give``
  returns units; a key holding nothing costs nothing, so the key table is bounded by the node
  cap. Every refusal is counted in ``refused`` (and per key in ``refused_by``, itself bounded)
  so a budget that is hit shows in ``stats()`` and ``/metrics``.
- :class:`LogLimiter` lets through the first ``burst`` lines per key and then one per
  ``interval_s``, saying how many it held back: a remote peer can move a counter as fast as it
  likes but cannot fill a disk with WARNING lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from mesh.errors import ConfigError

__all__ = ["Budget", "LogLimiter"]

_MAX_REFUSED_KEYS = 1024


class Budget:
    """Units held per key, under a per-key cap and a node-wide cap.

    Args:
        name: what is budgeted (used in counters and log lines, e.g. ``"replay_bytes"``).
        per_key: at most this many units held by one key.
        total: at most this many units held by all keys together.

    Raises:
        ConfigError: a cap is not positive.

    Not thread-safe: a budget belongs to the thread that owns the table it bounds.
    """

    __slots__ = ("_held", "_sum", "name", "per_key", "refused", "refused_by", "total")

    def __init__(self, name: str, per_key: int, total: int) -> None:
        if per_key < 1 or total < 1:
            raise ConfigError(f"budget {name!r} needs per_key >= 1 and total >= 1, "
                              f"got {per_key}, {total}")
        self.name = name
        self.per_key = per_key
        self.total = total
        self._held: dict[object, int] = {}
        self._sum = 0
        self.refused = 0
        self.refused_by: dict[object, int] = {}

    def take(self, key: object, n: int = 1) -> bool:
        """Hold ``n`` more units for ``key``; False (and counted) if a cap would be passed."""
        have = self._held.get(key, 0)
        if have + n > self.per_key or self._sum + n > self.total:
            self.refused += 1
            by = self.refused_by
            if key in by or len(by) < _MAX_REFUSED_KEYS:
                by[key] = by.get(key, 0) + 1
            return False
        self._held[key] = have + n
        self._sum += n
        return True

    def give(self, key: object, n: int = 1) -> None:
        """Return ``n`` units of ``key`` (never below zero; an unknown key is a no-op)."""
        have = self._held.get(key)
        if have is None:
            return
        n = min(n, have)
        self._sum -= n
        if have == n:
            del self._held[key]
        else:
            self._held[key] = have - n

    def room(self, key: object) -> int:
        """How many more units ``key`` may take now (its own cap and the total's)."""
        return min(self.per_key - self._held.get(key, 0), self.total - self._sum)

    def give_through(self, key: object, sent: MutableMapping[Any, int], token: object) -> None:
        """Return what ``key`` holds for the answers in ``sent`` (token -> units, oldest
        first) up to and including ``token``: the peer proved it read that answer, so it
        read every earlier one. A token not in ``sent`` returns nothing."""
        if token is None or token not in sent:
            return
        while sent:
            tok = next(iter(sent))
            self.give(key, sent.pop(tok))
            if tok == token:
                break

    def drop(self, key: object) -> None:
        """Return everything ``key`` holds (the peer is gone)."""
        self._sum -= self._held.pop(key, 0)
        self.refused_by.pop(key, None)

    def held(self, key: object | None = None) -> int:
        """Units held by ``key``, or by everyone when ``key`` is None."""
        return self._sum if key is None else self._held.get(key, 0)

    def keys(self) -> int:
        """How many keys hold something."""
        return len(self._held)

    def stats(self) -> dict[str, int]:
        """``{name}_held``, ``{name}_keys`` and ``{name}_refused``."""
        return {f"{self.name}_held": self._sum, f"{self.name}_keys": len(self._held),
                f"{self.name}_refused": self.refused}


class LogLimiter:
    """Let the first ``burst`` lines of a key through, then one per ``interval_s``.

    Args:
        logger: where lines go.
        burst: lines per key logged without limit.
        interval_s: after the burst, at most one line per key per this many seconds; that line
            says how many were held back since the last one.
        max_keys: keys remembered (beyond it the table is cleared, which only lets a few more
            lines through).
        clock: monotonic seconds (tests may pass their own).

    Thread-safe enough for logging: a race can at worst let one extra line through.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval_s: float = 10.0,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 0 or interval_s <= 0:
            raise ConfigError("LogLimiter needs burst >= 0 and interval_s > 0")
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.clock = clock
        self._k: dict[str, list[float]] = {}  # key -> [lines seen, held back, last logged at]
        self.suppressed = 0

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its rate; True if logged.

        ``exc_info`` adds the current exception's traceback (as ``logging`` does).
        """
        st = self._k.get(key)
        if st is None:
            if len(self._k) >= self.max_keys:
                self._k.clear()
            st = self._k[key] = [0.0, 0.0, 0.0]
        st[0] += 1
        now = self.clock()
        if st[0] <= self.burst:
            st[2] = now
            self.logger.log(level, msg, *args, exc_info=exc_info)
            return True
        if now - st[2] >= self.interval_s:
            held, st[1], st[2] = int(st[1]), 0.0, now
            self.logger.log(level, msg + " (%d more like this held back)", *args, held,
                            exc_info=exc_info)
            return True
        st[1] += 1
        self.suppressed += 1
        return False

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, key, msg, *args)
