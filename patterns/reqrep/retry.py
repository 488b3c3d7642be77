"""Backoff with full jitter and deadline arithmetic (pure; the clock and RNG are injected)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import ConfigError

__all__ = ["Backoff", "Deadline"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
    And Jitter"): attempt n waits a uniform random time in ``[0, min(cap, base * 2**n)]``.

    Full jitter spreads the retries of many clients that failed together, so a responder that
    comes back is not hit by a synchronized wave.

    Attributes:
        base: ceiling of the first wait, in seconds.
        cap: largest ceiling, in seconds.
    """

    base: float = 0.01
    cap: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ConfigError(f"backoff needs 0 < base <= cap, got {self.base}, {self.cap}")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the wait before retry number ``attempt`` (0-based)."""
        return float(min(self.cap, self.base * (2.0 ** min(attempt, 62))))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A jittered wait in ``[0, ceiling(attempt)]``."""
        return rand() * self.ceiling(attempt)


class Deadline:
    """A point in time on a monotonic clock, with the arithmetic callers keep getting wrong.

    Args:
        timeout: seconds from now; must be > 0.
        clock: the monotonic clock (injected in tests).

    Raises:
        ConfigError: timeout is not a positive number.
    """

    __slots__ = ("at", "clock", "timeout")

    def __init__(self, timeout: float, clock: Callable[[], float]) -> None:
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.clock = clock
        self.timeout = float(timeout)
        self.at = clock() + self.timeout

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.clock() >= self.at

    def cap(self, delay: float) -> float:
        """``delay`` shortened so that it never sleeps past the deadline."""
        return max(0.0, min(delay, self.remaining()))

    def ttl_ms(self) -> int:
        """Remaining time in whole milliseconds, for the wire (at least 1 while not expired)."""
        r = self.remaining()
        return max(1, int(r * 1000)) if r > 0 else 0
