"""The files of one work queue on its producer, and crash recovery.

Three logs in the node's :class:`mesh.log.LogDirectory`:

* ``<queue>.tasks``: one record per pushed task, ``0x00 payload`` (no key) or
  ``0x01 msgpack [key, payload]``; the record offset is the task id. Written by ``push()``
  before it returns.
* ``<queue>.journal``: the dispatcher's durable facts, one msgpack array per record:
  ``["D", [ids], [delivery numbers]]`` (written *before* the TASK frame is sent, so a poison
  task that kills its worker every time is still counted across producer restarts),
  ``["A", [ids]]`` acked, ``["F", id, attempt-map]`` a failed attempt (for the DLQ history),
  ``["X", id]`` dead-lettered, ``["K", low, [owed ids]]`` a compaction snapshot.
* ``<queue>.dlq``: the dead-letter stream (see :mod:`patterns.pipeline.dlq`).

Recovery replays the journal and re-queues every task of ``<queue>.tasks`` that is neither
acked nor dead, with its delivery count and failure history.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.errors import LogError
from mesh.log import FsyncPolicy, Log, LogConfig, LogDirectory

from .dispatch import Attempt

J_DISPATCH = "D"
J_ACK = "A"
J_FAIL = "F"
J_DEAD = "X"
J_SNAPSHOT = "K"


_BARE = b"\x00"
_KEYED = 0x01


def encode_task(key: Hashable | None, payload: bytes,
                trace: tuple[str | None, str | None, str | None] | None = None) -> bytes:
    """The ``<queue>.tasks`` record of one task: ``0x00 payload`` without a key nor trace (a
    concat: msgpack per push cost 0.55 us, a third of the push path), else
    ``0x01 msgpack[key, payload]``, or ``0x01 msgpack[key, payload, [traceparent,
    correlationid, causationid]]`` when the push ran inside a trace context."""
    if trace is not None:
        return b"\x01" + msgpack.packb([key, payload, list(trace)],  # type: ignore[no-any-return]
                                       use_bin_type=True)
    if key is None:
        return _BARE + payload
    return b"\x01" + msgpack.packb([key, payload], use_bin_type=True)  # type: ignore[no-any-return]


def decode_task(buf: bytes) -> tuple[Any, bytes]:
    """``(key, payload)`` of a ``<queue>.tasks`` record.

    Raises:
        LogError: the record is not a task record.
    """
    key, payload, _ = decode_task_traced(buf)
    return key, payload


def decode_task_traced(
    buf: bytes,
) -> tuple[Any, bytes, tuple[str | None, str | None, str | None] | None]:
    """``(key, payload, trace)`` of a ``<queue>.tasks`` record (trace None for records
    written without one, including every record of older versions).

    Raises:
        LogError: the record is not a task record.
    """
    if buf[:1] == _BARE:
        return None, buf[1:], None
    try:
        if buf[:1] != b"\x01":
            raise ValueError(f"unknown task record tag {buf[:1]!r}")
        rec = msgpack.unpackb(buf[1:], raw=False)
        if type(rec) is not list or len(rec) not in (2, 3):
            raise ValueError("not [key, payload] nor [key, payload, trace]")
    except Exception as exc:
        raise LogError(f"not a pipeline task record: {exc}") from exc
    key, payload = rec[0], rec[1]
    if not isinstance(payload, bytes):
        raise LogError("not a pipeline task record: payload is not bytes")
    trace = None
    if len(rec) == 3 and rec[2] is not None:
        t = rec[2]
        if type(t) is not list or len(t) != 3 or not all(x is None or type(x) is str for x in t):
            raise LogError("not a pipeline task record: trace is not [str|nil, str|nil, str|nil]")
        trace = (t[0], t[1], t[2])
    return key, payload, trace


def attempt_from(m: Any) -> Attempt:
    """An :class:`Attempt` from its msgpack map (journal / DLQ)."""
    return Attempt(
        int(m.get("delivery", 0)), str(m.get("worker", "")), float(m.get("dispatched_at", 0.0)),
        float(m.get("ended_at", 0.0)), str(m.get("outcome", "")), m.get("error_type"),
        m.get("error_message"), m.get("traceback"),
    )


def pipeline_root(data_dir: str | os.PathLike[str]) -> LogDirectory:
    """The log directory holding the pipeline streams of a node data directory."""
    return LogDirectory(data_dir)


@dataclass
class Recovered:
    """What :meth:`QueueStore.recover` found."""

    #: (id, key, data, deliveries, history); data is the payload, or (payload, trace) when
    #: the task was pushed inside a trace context.
    tasks: list[tuple[int, Any, Any, int, list[Attempt]]] = field(default_factory=list)
    next_id: int = 0
    acked: int = 0
    dead: int = 0


#: Journal records beyond which recovery rewrites the journal as a compact snapshot.
COMPACT_AFTER = 1000


class QueueStore:
    """Owns the ``<queue>.tasks`` and ``<queue>.journal`` logs of one producer.

    The journal has generations: ``<queue>.journal`` (0), then ``<queue>.journal.<n>``; the
    current one is named in ``<data_dir>/pipeline/<queue>.journal-gen`` (atomic rename). At
    open, a journal longer than :data:`COMPACT_AFTER` records is rewritten as one ``K`` record
    (``["K", low, [owed ids]]``: every id below ``low`` not listed is done) plus the delivery
    counts and histories of the owed tasks, so recovery stays proportional to what is owed,
    not to the queue's history.

    Raises:
        LogLocked: another process is the producer of this queue on this data directory.
    """

    def __init__(self, data_dir: str | os.PathLike[str], queue: str,
                 fsync: FsyncPolicy | None = None,
                 compact_after: int = COMPACT_AFTER) -> None:
        self.queue = queue
        self.root = pipeline_root(data_dir)
        self.compact_after = compact_after
        self._cfg = LogConfig(fsync=fsync or FsyncPolicy.interval(10.0))
        self.tasks: Log = self.root.open(f"{queue}.tasks", self._cfg)
        self._gen_file = os.path.join(self.root.root, "pipeline", f"{queue}.journal-gen")
        try:
            self.gen = self._read_gen()
            self.journal: Log = self.root.open(self._journal_name(self.gen), self._cfg)
        except BaseException:
            self.tasks.close()
            raise

    def _journal_name(self, gen: int) -> str:
        return f"{self.queue}.journal" if gen == 0 else f"{self.queue}.journal.{gen}"

    def _read_gen(self) -> int:
        try:
            with open(self._gen_file, encoding="ascii") as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise LogError(f"unreadable journal generation file {self._gen_file}: {exc}") from exc

    def _write_gen(self, gen: int) -> None:
        d = os.path.dirname(self._gen_file)
        os.makedirs(d, exist_ok=True)
        tmp = self._gen_file + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(gen))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._gen_file)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self) -> Recovered:
        """Replay the journal; return the tasks still owed, with delivery counts and history.

        Compacts the journal first when it is longer than ``compact_after`` records.
        """
        acked: set[int] = set()
        dead: set[int] = set()
        deliveries: dict[int, int] = {}
        history: dict[int, list[Attempt]] = {}
        low = 0  # ids below low are done unless in owed_below
        owed_below: set[int] = set()
        for rec in self.journal.iter(0):
            try:
                j = msgpack.unpackb(rec.payload, raw=False)
                kind = j[0]
                if kind == J_DISPATCH:
                    for tid, n in zip(j[1], j[2], strict=True):
                        if n > deliveries.get(tid, 0):
                            deliveries[tid] = n
                elif kind == J_ACK:
                    acked.update(j[1])
                elif kind == J_FAIL:
                    history.setdefault(j[1], []).append(attempt_from(j[2]))
                elif kind == J_DEAD:
                    dead.add(j[1])
                elif kind == J_SNAPSHOT:
                    low = int(j[1])
                    owed_below = set(j[2])
            except Exception:
                # A journal record we cannot read loses at most a count: the task stays owed.
                continue
        out = Recovered(next_id=self.tasks.next_offset)
        start = min(owed_below | {low})
        for rec in self.tasks.iter(start):
            tid = rec.offset
            if tid in acked or (tid < low and tid not in owed_below):
                out.acked += 1
                continue
            if tid in dead:
                out.dead += 1
                continue
            try:
                key, payload, trace = decode_task_traced(rec.payload)
            except LogError:
                continue
            # A traced task travels through the dispatcher as (payload, trace): see WorkQueue.
            data: Any = payload if trace is None else (payload, trace)
            out.tasks.append((tid, key, data, deliveries.get(tid, 0), history.get(tid, [])))
        if self.journal.next_offset > self.compact_after:
            self._compact(out)
        return out

    def _compact(self, rec: Recovered) -> None:
        new_gen = self.gen + 1
        name = self._journal_name(new_gen)
        old_path = self.root.path_for(self._journal_name(self.gen))
        new_path = self.root.path_for(name)
        shutil.rmtree(new_path, ignore_errors=True)  # a half-written earlier attempt
        new = self.root.open(name, self._cfg)
        try:
            owed = [t[0] for t in rec.tasks]
            recs = [msgpack.packb([J_SNAPSHOT, rec.next_id, owed])]
            counted = [(t[0], t[3]) for t in rec.tasks if t[3]]
            if counted:
                recs.append(msgpack.packb(
                    [J_DISPATCH, [c[0] for c in counted], [c[1] for c in counted]]
                ))
            for t in rec.tasks:
                for att in t[4]:
                    recs.append(msgpack.packb([J_FAIL, t[0], att.to_dict()], use_bin_type=True))
            new.append_many(recs)
            new.flush()
        except BaseException:
            new.close()
            raise
        # The switch is the atomic rename of the generation file; the old journal is only
        # deleted after it, so a crash at any point leaves one complete journal in use.
        self._write_gen(new_gen)
        self.journal.close()
        self.journal = new
        self.gen = new_gen
        shutil.rmtree(old_path, ignore_errors=True)

    def close(self) -> None:
        """Close both logs (flushing them)."""
        try:
            self.journal.close()
        finally:
            self.tasks.close()


def journal_dispatch(sends: list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]]) -> bytes:
    """The ``D`` journal record of one dispatch pass (ids and delivery numbers)."""
    ids = [item[0] for _, items in sends for item in items]
    ns = [item[1] for _, items in sends for item in items]
    return msgpack.packb([J_DISPATCH, ids, ns])  # type: ignore[no-any-return]


def journal_records(
    dispatched: list[tuple[int, int]],
    acked: list[int],
    failed: list[tuple[int, Attempt]],
    dead: list[int],
) -> list[bytes]:
    """Encode one I/O-loop pass of dispatcher facts as journal records (batched)."""
    out: list[bytes] = []
    pack = msgpack.packb
    if dispatched:
        out.append(pack([J_DISPATCH, [d[0] for d in dispatched], [d[1] for d in dispatched]]))
    if acked:
        out.append(pack([J_ACK, acked]))
    for tid, att in failed:
        out.append(pack([J_FAIL, tid, att.to_dict()], use_bin_type=True))
    for tid in dead:
        out.append(pack([J_DEAD, tid]))
    return out
