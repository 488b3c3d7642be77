"""RFC 9562 UUIDv7: time-ordered, monotonic identifiers for events.

Layout (128 bits, big-endian)::

    unix_ts_ms (48) | ver=0b0111 (4) | rand_a (12) | var=0b10 (2) | rand_b (62)

``rand_a`` is used as a 12-bit counter (RFC 9562 section 6.2, "Fixed Bit-Length Dedicated
Counter", method 1): within one millisecond each new id increments it, so ids made by one
process sort in creation order even when thousands are made in the same millisecond. When a
millisecond starts the counter is seeded with 11 random bits (the top bit left clear, as the RFC
suggests, so at least 2048 increments fit before overflow). On overflow, or when the wall clock
steps backwards, the generator keeps using the last timestamp (advancing it by one millisecond
on overflow) rather than going back in time: monotonicity within a process wins over exact
timestamps, which stay within a few milliseconds of the truth.

``rand_b`` comes from a PRNG seeded from ``os.urandom`` and re-seeded in every forked child, so
two processes (or a parent and its fork) never share a sequence. The ids are unique, not secret.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from datetime import UTC, datetime, timedelta

from mesh.errors import MalformedEvent

__all__ = ["uuid7", "uuid7_int", "uuid7_time"]

_VERSION_BITS = 0x7 << 76
_VARIANT_BITS = 0b10 << 62
_MAX_COUNTER = 0xFFF

_lock = threading.Lock()
_rng = random.Random(os.urandom(32))
_last_ms = 0
_counter = 0


def _reseed_after_fork() -> None:
    # A forked child inherits the PRNG state: without a fresh seed it would repeat the parent's
    # rand_b values. The lock may have been held by another thread at fork time: replace it.
    global _lock, _rng
    _lock = threading.Lock()
    _rng = random.Random(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


def _next(now_ns: int | None) -> tuple[int, int, int]:
    """Return (unix_ts_ms, counter, rand_b) of the next id."""
    global _last_ms, _counter
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rng.getrandbits(11)
        else:
            # Same millisecond, or the clock stepped back: count on from the last id.
            _counter += 1
            if _counter > _MAX_COUNTER:
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        return ms & 0xFFFF_FFFF_FFFF, _counter, _rng.getrandbits(62)


def uuid7_int(now_ns: int | None = None) -> int:
    """Return a new UUIDv7 as a 128-bit integer.

    Args:
        now_ns: the current time in nanoseconds since the Unix epoch, if the caller has read
            the clock already (saves a second clock read); ``time.time_ns()`` otherwise.
    """
    ms, counter, rand_b = _next(now_ns)
    return (ms << 80) | _VERSION_BITS | (counter << 64) | _VARIANT_BITS | rand_b


def uuid7(now_ns: int | None = None) -> str:
    """Return a new UUIDv7 in canonical text form (36 lowercase characters).

    Ids made by one process are strictly increasing, as integers and as strings.

    Args:
        now_ns: the current time in nanoseconds since the Unix epoch, if already read.
    """
    ms, counter, rand_b = _next(now_ns)
    low = _VARIANT_BITS | rand_b
    # %-formatting measured fastest here (0.74 µs against 1.1-1.3 µs for f-strings with slices).
    return "%08x-%04x-%04x-%04x-%012x" % (  # noqa: UP031
        ms >> 16,
        ms & 0xFFFF,
        0x7000 | counter,
        low >> 48,
        low & 0xFFFF_FFFF_FFFF,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CANONICAL = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def uuid7_time(id_str: str) -> datetime:
    """Return the creation time (millisecond precision, UTC) embedded in a UUIDv7 string.

    Args:
        id_str: a UUIDv7 in canonical text form (either case).

    Raises:
        MalformedEvent: ``id_str`` is not a canonical UUID text of version 7 and variant 10
            (``field`` is ``"id"``).
    """
    if not isinstance(id_str, str) or _CANONICAL.fullmatch(id_str) is None:
        raise MalformedEvent(f"not a canonical UUID: {id_str!r}", field="id")
    value = int(id_str.replace("-", ""), 16)
    if (value >> 76) & 0xF != 7 or (value >> 62) & 0b11 != 0b10:
        raise MalformedEvent(f"not a UUIDv7: {id_str!r}", field="id")
    return _EPOCH + timedelta(milliseconds=value >> 80)
