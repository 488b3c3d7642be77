"""The dead-letter queue of a work queue: the stream ``<queue>.dlq`` and its operations.

A DLQ record (msgpack map, one per dead task) keeps the original task untouched (``payload``,
``key``) with the facts of its death: ``reason`` (``max_deliveries`` / ``term``), the last
error's type, message and traceback, the delivery count, the retry history with times, the
queue, the producer's node id, and ``dead_at``.

Logs are append-only, so operations on DLQ entries are records of a second stream,
``<queue>.dlq-ops``: ``discard``, ``redrive_requested`` and ``redriven`` (with the new task
id). An entry's status is its last operation. Redrive pushes the original task again as a new
task (a new id, delivery count 0): directly into ``<queue>.tasks`` when no producer runs, or,
when a producer holds the queue, as a ``redrive_requested`` record that the running producer
picks up within about a second and fulfils.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.errors import ConfigError, DLQEntryNotFound, LogError, LogLocked
from mesh.log import Log, LogConfig

from .dispatch import Attempt, DeadLetter
from .store import attempt_from, encode_task, pipeline_root

DLQ_VERSION = 1

#: Statuses of a DLQ entry.
DEAD = "dead"
DISCARDED = "discarded"
REDRIVEN = "redriven"
REDRIVE_REQUESTED = "redrive_requested"


def dlq_stream(queue: str) -> str:
    """The stream name of ``queue``'s dead letters."""
    return f"{queue}.dlq"


def ops_stream(queue: str) -> str:
    """The stream name recording operations on ``queue``'s dead letters."""
    return f"{queue}.dlq-ops"


def encode_dead_letter(queue: str, producer: str, dl: DeadLetter, payload: bytes,
                       dead_at: float) -> bytes:
    """Encode the DLQ record of ``dl`` (the original ``payload`` kept byte for byte)."""
    last = dl.history[-1] if dl.history else None
    rec = {
        "v": DLQ_VERSION,
        "queue": queue,
        "task_id": dl.task_id,
        "key": dl.key,
        "payload": payload,
        "reason": dl.reason,
        "error_type": last.error_type if last else None,
        "error_message": last.error_message if last else None,
        "traceback": last.traceback if last else None,
        "deliveries": dl.deliveries,
        "history": [a.to_dict() for a in dl.history],
        "dead_at": dead_at,
        "producer": producer,
    }
    return msgpack.packb(rec, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass
class DLQEntry:
    """One dead letter as read back, with its status.

    Attributes:
        offset: position in ``<queue>.dlq`` (the entry's id for show / redrive / discard).
        task_id: the task's id in ``<queue>.tasks`` when it died.
        payload: the original task payload, untouched.
        status: ``dead``, ``discarded``, ``redriven`` or ``redrive_requested``.
        ops: the operations recorded on this entry, oldest first.
    """

    offset: int
    queue: str
    task_id: int
    key: Any
    payload: bytes
    reason: str
    error_type: str | None
    error_message: str | None
    traceback: str | None
    deliveries: int
    history: list[Attempt]
    dead_at: float
    producer: str
    status: str = DEAD
    ops: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, *, payload_limit: int | None = None) -> dict[str, Any]:
        """A JSON-ready mapping (payload as text when UTF-8, else hex)."""
        p = self.payload if payload_limit is None else self.payload[:payload_limit]
        try:
            shown: str = p.decode("utf-8")
            enc = "utf-8"
        except UnicodeDecodeError:
            shown, enc = p.hex(), "hex"
        key = self.key.hex() if isinstance(self.key, bytes) else self.key
        return {
            "offset": self.offset, "queue": self.queue, "task_id": self.task_id, "key": key,
            "payload": shown, "payload_encoding": enc, "payload_bytes": len(self.payload),
            "reason": self.reason, "error_type": self.error_type,
            "error_message": self.error_message, "traceback": self.traceback,
            "deliveries": self.deliveries, "history": [a.to_dict() for a in self.history],
            "dead_at": self.dead_at, "producer": self.producer, "status": self.status,
            "ops": self.ops,
        }


def _decode_entry(offset: int, buf: bytes) -> DLQEntry:
    try:
        m = msgpack.unpackb(buf, raw=False)
        if not isinstance(m, dict) or not isinstance(m.get("payload"), bytes):
            raise ValueError("not a map with a payload")
        return DLQEntry(
            offset=offset, queue=str(m.get("queue", "")), task_id=int(m["task_id"]),
            key=m.get("key"), payload=m["payload"], reason=str(m.get("reason", "")),
            error_type=m.get("error_type"), error_message=m.get("error_message"),
            traceback=m.get("traceback"), deliveries=int(m.get("deliveries", 0)),
            history=[attempt_from(a) for a in m.get("history") or []],
            dead_at=float(m.get("dead_at", 0.0)), producer=str(m.get("producer", "")),
        )
    except Exception as exc:
        raise LogError(f"DLQ record at offset {offset} is not readable: {exc}") from exc


def _open_retrying(path: str, timeout: float = 5.0) -> Log:
    # The ops stream is opened briefly by whoever records an operation (producer, CLI): on a
    # clash, wait for the other writer rather than fail.
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Log.open(path, config=LogConfig())
        except LogLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)  # waiting for another process's short critical section


class DeadLetters:
    """Read and operate on the DLQ of ``queue`` in a node data directory.

    Usable with no producer running (the CLI) and beside a running producer.

    Args:
        data_dir: the node's data directory.
        queue: the queue name.
        push: how to push a redriven task; given by a running :class:`WorkQueue`. When None,
            redrive appends to ``<queue>.tasks`` itself, or records a request for the running
            producer when that log is locked.
    """

    def __init__(self, data_dir: str | os.PathLike[str], queue: str, *,
                 push: Callable[[bytes, Hashable | None], int] | None = None,
                 actor: str = "api") -> None:
        self.root = pipeline_root(data_dir)
        self.queue = queue
        self._push = push
        self.actor = actor
        self._ops_seen = -1
        self.root.path_for(dlq_stream(queue))  # validates the name

    # -- reading --------------------------------------------------------------------------
    def _read_all(self) -> list[DLQEntry]:
        path = self.root.path_for(dlq_stream(self.queue))
        if not os.path.isdir(path):
            return []
        log = Log.open(path, readonly=True)
        try:
            entries = [_decode_entry(r.offset, r.payload) for r in log.iter(0)]
        finally:
            log.close()
        by_off = {e.offset: e for e in entries}
        for op in self.ops():
            e = by_off.get(op.get("entry", -1))
            if e is not None:
                e.ops.append(op)
                e.status = {"discard": DISCARDED, "redriven": REDRIVEN,
                            "redrive_requested": REDRIVE_REQUESTED}.get(str(op.get("op")), e.status)
        return entries

    def ops(self) -> list[dict[str, Any]]:
        """Every operation recorded on this DLQ, oldest first."""
        path = self.root.path_for(ops_stream(self.queue))
        if not os.path.isdir(path):
            return []
        log = Log.open(path, readonly=True)
        try:
            out = []
            for r in log.iter(0):
                try:
                    m = msgpack.unpackb(r.payload, raw=False)
                except Exception:
                    continue
                if isinstance(m, dict):
                    m["seq"] = r.offset
                    out.append(m)
            return out
        finally:
            log.close()

    def list(self, *, include_all: bool = False) -> list[DLQEntry]:
        """Dead letters; by default only those still ``dead`` or ``redrive_requested``."""
        entries = self._read_all()
        if include_all:
            return entries
        return [e for e in entries if e.status in (DEAD, REDRIVE_REQUESTED)]

    def show(self, offset: int) -> DLQEntry:
        """One entry with its history and operations.

        Raises:
            DLQEntryNotFound: no entry at ``offset``.
        """
        for e in self._read_all():
            if e.offset == offset:
                return e
        raise DLQEntryNotFound(self.queue, offset)

    # -- operations -----------------------------------------------------------------------
    def _record(self, op: dict[str, Any]) -> None:
        op.setdefault("at", time.time())
        op.setdefault("by", self.actor)
        log = _open_retrying(self.root.path_for(ops_stream(self.queue)))
        try:
            log.append(msgpack.packb(op, use_bin_type=True))
        finally:
            log.close()

    def discard(self, offset: int) -> DLQEntry:
        """Mark an entry discarded (it stays in the stream; the operation is recorded).

        Raises:
            DLQEntryNotFound: no entry at ``offset``.
            ConfigError: the entry was already discarded or redriven.
        """
        e = self.show(offset)
        if e.status in (DISCARDED, REDRIVEN):
            raise ConfigError(f"dead letter {offset} of {self.queue!r} is already {e.status}")
        self._record({"op": "discard", "entry": offset})
        e.status = DISCARDED
        return e

    def redrive(self, offset: int) -> DLQEntry:
        """Push the entry's original task back onto the queue as a new task; recorded.

        Returns the entry with status ``redriven`` (pushed now) or ``redrive_requested``
        (a running producer holds the queue and will push it within about a second).

        Raises:
            DLQEntryNotFound: no entry at ``offset``.
            ConfigError: the entry was already discarded or redriven.
        """
        e = self.show(offset)
        if e.status in (DISCARDED, REDRIVEN):
            raise ConfigError(f"dead letter {offset} of {self.queue!r} is already {e.status}")
        if self._push is not None:
            new_id = self._push(e.payload, e.key)
        else:
            try:
                log = Log.open(self.root.path_for(f"{self.queue}.tasks"), config=LogConfig())
            except LogLocked:
                if e.status != REDRIVE_REQUESTED:
                    self._record({"op": "redrive_requested", "entry": offset})
                e.status = REDRIVE_REQUESTED
                return e
            try:
                new_id = log.append(encode_task(e.key, e.payload))
            finally:
                log.close()
        self._record({"op": "redriven", "entry": offset, "task_id": new_id})
        e.status = REDRIVEN
        return e

    def ops_count(self) -> int:
        """How many operations were ever recorded (cheap: no record is decoded)."""
        path = self.root.path_for(ops_stream(self.queue))
        if not os.path.isdir(path):
            return 0
        log = Log.open(path, readonly=True)
        try:
            return log.next_offset
        finally:
            log.close()

    def fulfil_requests(self) -> int:
        """(Producer side) push every ``redrive_requested`` entry; returns how many.

        Reads the DLQ only when new operations were recorded since the last call.
        """
        count = self.ops_count()
        if count == self._ops_seen:
            return 0
        self._ops_seen = count
        n = 0
        for e in self._read_all():
            if e.status == REDRIVE_REQUESTED:
                self.redrive(e.offset)
                n += 1
        return n
