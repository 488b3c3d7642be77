"""Reliable pipeline: PUSH/PULL work queues with acks, redelivery, backoff and a DLQ.

Layers (each imports only the ones above it)::

    frames.py    pure wire codecs               backoff.py   pure delays + retry budget
    dispatch.py  pure dispatcher state machine (events + clock in, actions out)
    store.py     the queue's files: task log, journal (deliveries, acks), recovery
    dlq.py       the dead-letter stream <queue>.dlq: list / show / redrive / discard
    queue.py     WorkQueue (producer side, one I/O thread owning a ROUTER)
    worker.py    Worker (consumer side, DEALERs owned by the user thread)
    aio.py       asyncio twins
"""

from __future__ import annotations

from mesh.errors import DLQEntryNotFound, WrongThread

from .aio import AsyncWorker, AsyncWorkQueue
from .backoff import Backoff, RetryBudgetConfig
from .dispatch import DispatchConfig
from .dlq import DeadLetters, DLQEntry
from .queue import WorkQueue
from .worker import Task, TaskTerminated, Worker

__all__ = [
    "AsyncWorkQueue",
    "AsyncWorker",
    "Backoff",
    "DLQEntry",
    "DLQEntryNotFound",
    "DeadLetters",
    "DispatchConfig",
    "RetryBudgetConfig",
    "Task",
    "TaskTerminated",
    "WorkQueue",
    "Worker",
    "WrongThread",
]
