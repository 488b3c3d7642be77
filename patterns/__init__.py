"""Messaging patterns built on ``mesh``'s public API.

- :mod:`patterns.pubsub`: durable streams, gap recovery, replay, durable subscriptions.
- :mod:`patterns.pipeline`: work queues with acks, redelivery, backoff and a dead-letter queue.
- :mod:`patterns.reqrep`: services by name with retries, failover and no double execution.

The most used classes are re-exported here; each subpackage exports its full API (for example
the two ``Backoff`` classes, which differ, stay in ``patterns.pipeline`` and ``patterns.reqrep``).
"""

from patterns.pipeline import (
    AsyncWorker,
    AsyncWorkQueue,
    DeadLetters,
    DispatchConfig,
    Task,
    TaskTerminated,
    Worker,
    WorkQueue,
)
from patterns.pubsub import (
    AsyncPublisher,
    AsyncSubscriber,
    Dedup,
    Publisher,
    RetentionGap,
    Start,
    StreamGap,
    StreamReset,
    Subscriber,
)
from patterns.reqrep import (
    AsyncClient,
    Client,
    ClientConfig,
    DurableClient,
    Incoming,
    NoResponders,
    RemoteError,
    RequestTimeout,
    Service,
    ServiceConfig,
)

__all__ = [
    "AsyncClient",
    "AsyncPublisher",
    "AsyncSubscriber",
    "AsyncWorkQueue",
    "AsyncWorker",
    "Client",
    "ClientConfig",
    "DeadLetters",
    "Dedup",
    "DispatchConfig",
    "DurableClient",
    "Incoming",
    "NoResponders",
    "Publisher",
    "RemoteError",
    "RequestTimeout",
    "RetentionGap",
    "Service",
    "ServiceConfig",
    "Start",
    "StreamGap",
    "StreamReset",
    "Subscriber",
    "Task",
    "TaskTerminated",
    "WorkQueue",
    "Worker",
]
