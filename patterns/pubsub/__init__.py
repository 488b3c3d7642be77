"""Reliable pub/sub: durable streams, gap recovery, replay, durable subscriptions.

Layers: :mod:`.frames` (wire codecs) and :mod:`.gaps` (sequence tracker) are pure; :mod:`.dedup`
is the idempotency helper; :mod:`.publisher`, :mod:`.subscriber` and :mod:`.aio` sit on the
node's public API.
"""

from typing import TYPE_CHECKING, Any

from patterns.pubsub.dedup import Dedup
from patterns.pubsub.publisher import Publisher, PublisherStats
from patterns.pubsub.store import Store, StoreStats
from patterns.pubsub.subscriber import (
    Batch,
    RetentionGap,
    Start,
    StreamGap,
    StreamReset,
    Subscriber,
    SubscriberStats,
)

if TYPE_CHECKING:
    from patterns.pubsub.aio import AsyncPublisher, AsyncSubscriber


def __getattr__(name: str) -> Any:
    # The asyncio wrappers load on first use (PEP 562): a blocking caller, such as a one-shot
    # `mesh pub`, does not pay for asyncio's import.
    if name in ("AsyncPublisher", "AsyncSubscriber"):
        from patterns.pubsub import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncPublisher",
    "AsyncSubscriber",
    "Batch",
    "Dedup",
    "Publisher",
    "PublisherStats",
    "RetentionGap",
    "Start",
    "Store",
    "StoreStats",
    "StreamGap",
    "StreamReset",
    "Subscriber",
    "SubscriberStats",
]
