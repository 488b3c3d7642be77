"""Per-peer ingress rate limits: a token bucket per sender key (pure logic, no I/O).

The control channel charges each incoming multipart one token per control message it carries
(before decoding it, so a flood costs the receiver almost nothing); a peer out of tokens has
the multipart dropped and counted. Buckets are keyed by the CURVE key of the handshake (what
the sender cannot choose), and their number is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import ConfigError

__all__ = ["RateLimit", "TokenBuckets"]


@dataclass(frozen=True)
class RateLimit:
    """A token bucket's shape.

    Attributes:
        rate: tokens added per second (sustained messages per second per peer).
        burst: bucket size (messages a quiet peer may send at once).

    Raises:
        ConfigError: rate or burst not positive.
    """

    rate: float = 20_000.0
    burst: float = 40_000.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ConfigError(f"rate limit needs rate > 0 and burst >= 1, got {self}")


class TokenBuckets:
    """One token bucket per key.

    Args:
        limit: the bucket shape.
        max_keys: at most this many buckets; beyond it the fullest (idle) ones are forgotten
            (a forgotten peer starts again with a full bucket, which only ever favours it).
    """

    def __init__(self, limit: RateLimit, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._b: dict[str, list[float]] = {}  # key -> [tokens, last refill time]
        self.dropped: dict[str, int] = {}

    def allow(self, key: str, cost: float, now: float) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False (and counted) when it is short."""
        b = self._b.get(key)
        lim = self.limit
        if b is None:
            if len(self._b) >= self.max_keys:
                self._prune(now)
            b = self._b[key] = [lim.burst, now]
        else:
            tokens = b[0] + (now - b[1]) * lim.rate
            b[0] = tokens if tokens < lim.burst else lim.burst
            b[1] = now
        if b[0] >= cost:
            b[0] -= cost
            return True
        self.dropped[key] = self.dropped.get(key, 0) + 1
        return False

    def _prune(self, now: float) -> None:
        lim = self.limit
        full = [k for k, (t, last) in self._b.items() if t + (now - last) * lim.rate >= lim.burst]
        for k in full or list(self._b)[: len(self._b) // 2]:
            del self._b[k]
