"""Messaging patterns built on ``mesh``'s public API.

- :mod:`patterns.pubsub`: durable streams, gap recovery, replay, durable subscriptions.
- :mod:`patterns.pipeline`: work queues with acks, redelivery, backoff and a dead-letter queue.
- :mod:`patterns.reqrep`: services by name with retries, failover and no double execution.

The most used classes are re-exported here; each subpackage exports its full API (for example
the two ``Backoff`` classes, which differ, stay in ``patterns.pipeline`` and ``patterns.reqrep``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each re-exported name lives. Imported on first use (PEP 562): a command that
#: needs only pub/sub does not pay for the other patterns (about 0.2 s of imports).
_WHERE = {
    "AsyncClient": "patterns.reqrep",
    "AsyncPublisher": "patterns.pubsub",
    "AsyncSubscriber": "patterns.pubsub",
    "AsyncWorkQueue": "patterns.pipeline",
    "AsyncWorker": "patterns.pipeline",
    "Client": "patterns.reqrep",
    "ClientConfig": "patterns.reqrep",
    "DeadLetters": "patterns.pipeline",
    "Dedup": "patterns.pubsub",
    "DispatchConfig": "patterns.pipeline",
    "DurableClient": "patterns.reqrep",
    "Incoming": "patterns.reqrep",
    "NoResponders": "patterns.reqrep",
    "Publisher": "patterns.pubsub",
    "RemoteError": "patterns.reqrep",
    "RequestTimeout": "patterns.reqrep",
    "RetentionGap": "patterns.pubsub",
    "Service": "patterns.reqrep",
    "ServiceConfig": "patterns.reqrep",
    "Start": "patterns.pubsub",
    "StreamGap": "patterns.pubsub",
    "StreamReset": "patterns.pubsub",
    "Subscriber": "patterns.pubsub",
    "Task": "patterns.pipeline",
    "TaskTerminated": "patterns.pipeline",
    "WorkQueue": "patterns.pipeline",
    "Worker": "patterns.pipeline",
}

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


def __getattr__(name: str) -> Any:
    """Import a re-exported name from its subpackage on first use."""
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'patterns' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
