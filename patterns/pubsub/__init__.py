"""Reliable pub/sub: durable streams, gap recovery, replay, durable subscriptions.

Layers: :mod:`.frames` (wire codecs) and :mod:`.gaps` (sequence tracker) are pure; :mod:`.dedup`
is the idempotency helper; :mod:`.publisher`, :mod:`.subscriber` and :mod:`.aio` sit on the
node's public API.
"""

from patterns.pubsub.aio import AsyncPublisher, AsyncSubscriber
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
