"""Retry delays (exponential backoff with full jitter) and a per-queue retry budget.

Both are pure: time comes in as an argument, randomness from an injected ``random.Random``,
so the dispatcher tests drive them with a fake clock and a seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.errors import ConfigError


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
    And Jitter"): attempt ``n`` (1-based) waits ``uniform(0, min(cap, base * factor**(n-1)))``.

    Full jitter rather than "equal" jitter because it spreads a burst of failures the most, which
    is what breaks a retry storm against a struggling downstream.

    Attributes:
        base: upper bound of the first retry delay, seconds.
        factor: growth of the upper bound per attempt.
        cap: the largest upper bound, seconds.
    """

    base: float = 0.1
    factor: float = 2.0
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.factor >= 1 and self.cap >= self.base):
            raise ConfigError(
                f"backoff needs base >= 0, factor >= 1, cap >= base; got {self}"
            )

    def bound(self, attempt: int) -> float:
        """The upper bound of the delay after failed attempt ``attempt`` (1-based)."""
        if attempt < 1:
            attempt = 1
        # Stop growing once past the cap, so huge attempt numbers never overflow a float.
        exp = min(attempt - 1, 1024)
        try:
            return min(self.cap, self.base * self.factor**exp)
        except OverflowError:
            return self.cap

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered delay in ``[0, bound(attempt)]``."""
        return rng.uniform(0.0, self.bound(attempt))


@dataclass(frozen=True)
class RetryBudgetConfig:
    """Token bucket limiting how many retries per second a queue dispatches.

    Attributes:
        rate: tokens (retries) added per second; ``0`` disables the budget.
        burst: bucket size: retries allowed at once before the rate applies.
    """

    rate: float = 1000.0
    burst: float = 1000.0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 1:
            raise ConfigError(f"retry budget needs rate >= 0 and burst >= 1; got {self}")


class RetryBudget:
    """A token bucket with reservations (like Go's ``rate.Limiter.Reserve``).

    A retry never gets dropped for lack of budget: it reserves a token and is told how much
    longer to wait for it. The bucket may go negative; each further reservation then waits
    behind the earlier ones, so retries of a storm come out at ``rate`` per second.
    """

    def __init__(self, config: RetryBudgetConfig, now: float) -> None:
        self.config = config
        self._tokens = float(config.burst)
        self._last = now
        self.throttled = 0  #: reservations that had to wait

    def reserve(self, now: float) -> float:
        """Take one token; return the extra wait in seconds (0 when one was available)."""
        rate = self.config.rate
        if rate <= 0:
            return 0.0
        if now > self._last:
            self._tokens = min(self.config.burst, self._tokens + (now - self._last) * rate)
            self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        self.throttled += 1
        return -self._tokens / rate
