"""The files of one work queue on its producer, and crash recovery.

The queue's logs live in their own namespace, ``<data_dir>/queues/streams/<queue>.<kind>``
(:func:`pipeline_root`, the one place that knows it), apart from user streams
(``<data_dir>/streams/``), so a user stream named ``q.tasks`` can never collide with them. A
data directory written by an older version (queue logs in ``streams/``) is migrated at the
first open: the queue's ``.tasks``, ``.journal*``, ``.dlq`` and ``.dlq-ops`` directories are
renamed into ``queues/streams/``.

* ``<queue>.tasks``: one record per pushed task, ``0x00 payload`` (no key) or
  ``0x01 msgpack [key, payload]``; the record offset is the task id. Written by ``push()``
  before it returns.
* ``<queue>.journal``: the dispatcher's durable facts, one msgpack array per record:
  ``["D", [ids], [delivery numbers]]`` (written *before* the TASK frame is sent, so a poison
  task that kills its worker every time is still counted across producer restarts),
  ``["A", [ids]]`` acked, ``["F", id, attempt-map]`` a failed attempt (for the DLQ history),
  ``["X", id]`` dead-lettered, ``["K", low, [owed ids]]`` a compaction snapshot. Each record
  ends with the writer epoch of ``<queue>.tasks`` its ids refer to (records of older versions
  have none and are trusted as they are).
* ``<queue>.dlq``: the dead-letter stream (see :mod:`patterns.pipeline.dlq`).

Recovery replays the journal and re-queues every task of ``<queue>.tasks`` that is neither
acked nor dead, with its delivery count and failure history.

Power cuts: ``.tasks`` and ``.journal`` are fsynced separately, so the journal can hold facts
about task ids whose records ``.tasks`` lost (its unsynced tail). The task log then starts a new
writer epoch where it now ends and hands those ids out again, to new tasks. A journal fact
applies only to ids below the end of the epoch it was written under
(:meth:`mesh.log.EpochHistory.end_of`); the others are dropped, and the ids they name are
reported as lost (``Recovered.lost_ranges``, a warning, the queue's ``lost_tasks`` stat).

Missing files: a journal with records but no ``.tasks`` log (deleted), or a ``.tasks`` log with
records but no journal, raises :class:`~mesh.errors.QueueStateMissing` at open unless the
producer is opened with ``accept_loss=True`` (then: a loud warning, and the loss is counted).
A damaged record in either log is skipped and counted (``corruption="skip"``): journal facts
are idempotent, so a lost one costs at most a re-run; ``mesh log repair`` cuts the damage out.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.errors import LogError, QueueStateMissing
from mesh.log import FsyncPolicy, Log, LogConfig, LogDirectory, Retention

from .dispatch import Attempt

J_DISPATCH = "D"
J_ACK = "A"
J_FAIL = "F"
J_DEAD = "X"
J_SNAPSHOT = "K"

log = logging.getLogger(__name__)

#: The directory (below the data directory) of the queues' own logs, see :func:`pipeline_root`.
QUEUES_DIR = "queues"
#: Suffixes of a queue's internal logs (``<queue><suffix>``; ``.journal.<n>`` generations too).
_QUEUE_SUFFIXES = (".tasks", ".journal", ".dlq", ".dlq-ops")


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


class QueueLogDirectory(LogDirectory):
    """The queues' logs of one data directory: ``<data_dir>/queues/streams/<name>``.

    ``root`` stays the data directory (at-rest key lookup, ``pipeline/`` state files). Each
    :meth:`path_for` first migrates the log from its pre-namespace place
    (``<data_dir>/streams/<name>``) when only that one exists, see :func:`migrate_queue_log`.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        super().__init__(data_dir)
        self.streams_dir = os.path.join(self.root, QUEUES_DIR, "streams")

    def path_for(self, stream: str) -> str:
        """The directory of the queue log ``stream`` (migrated first, see the class)."""
        path = super().path_for(stream)
        migrate_queue_log(self.root, stream, path)
        return path


def pipeline_root(data_dir: str | os.PathLike[str]) -> LogDirectory:
    """The log directory holding the queues' internal logs (``<queue>.tasks``,
    ``<queue>.journal``, ``<queue>.dlq``, ``<queue>.dlq-ops``) of a node data directory.

    The one function that knows where they live (``<data_dir>/queues/streams/``, apart from
    user streams); the producer, the DLQ and the CLI all go through it.
    """
    return QueueLogDirectory(data_dir)


def _queue_of(name: str) -> str | None:
    for suf in _QUEUE_SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    head, _, gen = name.rpartition(".journal.")
    if head and gen.isdigit():
        return head
    return None


def migrate_queue_log(data_dir: str, name: str, new_path: str) -> bool:
    """Move ``<data_dir>/streams/<name>`` to ``new_path`` when it is a queue's internal log
    left by an older version and ``new_path`` does not exist yet; returns whether it moved.

    A ``.tasks`` or ``.journal*`` log counts as a queue's only if its queue also has a journal
    (old or new place) or a journal generation file, so a user stream that merely ends in
    ``.tasks`` stays put; a ``.dlq`` / ``.dlq-ops`` log (a queue's or a bridge's dead letters,
    only ever opened through :class:`~patterns.pipeline.dlq.DeadLetters` or a producer) moves
    when it is opened here.
    """
    old = os.path.join(data_dir, "streams", name)
    if os.path.lexists(new_path) or not os.path.isdir(old):
        return False
    queue = _queue_of(name)
    if queue is None:
        return False
    new_streams = os.path.dirname(new_path)
    evidence = (os.path.isdir(os.path.join(data_dir, "streams", f"{queue}.journal"))
                or os.path.isdir(os.path.join(new_streams, f"{queue}.journal"))
                or os.path.exists(os.path.join(data_dir, "pipeline", f"{queue}.journal-gen")))
    if not evidence and not name.endswith((".dlq", ".dlq-ops")):
        return False
    os.makedirs(new_streams, exist_ok=True)
    os.rename(old, new_path)
    for d in (os.path.dirname(old), new_streams):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.warning("queue %s: moved its log %s from %s to %s (queue logs have their own "
                "namespace now)", queue, name, old, new_path)
    return True


class _Bits:
    """A set of ints in ``[base, end)`` as a bitmap (others are ignored / absent)."""

    __slots__ = ("base", "bits", "end")

    def __init__(self, base: int, end: int) -> None:
        self.base = base
        self.end = end
        self.bits = bytearray((max(0, end - base) >> 3) + 1)

    def add(self, i: int) -> None:
        if self.base <= i < self.end:
            i -= self.base
            self.bits[i >> 3] |= 1 << (i & 7)

    def add_all(self, ids: list[int]) -> None:
        bits, base, end = self.bits, self.base, self.end
        for i in ids:
            if base <= i < end:
                i -= base
                bits[i >> 3] |= 1 << (i & 7)

    def __contains__(self, i: int) -> bool:
        if not self.base <= i < self.end:
            return False
        i -= self.base
        return bool(self.bits[i >> 3] & (1 << (i & 7)))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class Recovered:
    """What :meth:`QueueStore.recover` found."""

    #: (id, key, data, deliveries, history); data is the payload, or (payload, trace) when
    #: the task was pushed inside a trace context.
    tasks: list[tuple[int, Any, Any, int, list[Attempt]]] = field(default_factory=list)
    next_id: int = 0
    acked: int = 0
    dead: int = 0
    #: Ids ``(start, end)`` (end exclusive) of tasks the journal knew of that ``.tasks`` no
    #: longer holds (a lost unsynced tail or a deleted log), merged with the task log's own
    #: lost ranges. Their facts were dropped; those ids now name new tasks.
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Journal facts dropped because they were about ids of a lost ``.tasks`` tail.
    stale_facts: int = 0
    #: Damaged records skipped in the journal and in ``.tasks`` (since they were opened).
    journal_corrupt_records: int = 0
    tasks_corrupt_records: int = 0
    #: True when the journal was missing (every task of ``.tasks`` is owed again).
    journal_missing: bool = False
    #: True when ``.tasks`` was missing while the journal had records.
    tasks_missing: bool = False

    @property
    def lost_tasks(self) -> int:
        """How many task ids :attr:`lost_ranges` covers."""
        return sum(b - a for a, b in self.lost_ranges)


#: Journal records beyond which recovery rewrites the journal as a compact snapshot.
COMPACT_AFTER = 1000
#: Journal bytes written since the last snapshot beyond which a running producer rewrites it
#: (online compaction; also at least 64 bytes per task owed, so a big backlog is not
#: rewritten too often): bounds the journal's disk, and recovery's time and memory.
COMPACT_BYTES = 2 << 20
#: Segment size of ``<queue>.tasks``: segments wholly below the lowest owed id are deleted,
#: so this is the granularity of its disk use.
TASKS_SEGMENT_BYTES = 8 << 20
#: The retention floor of ``<queue>.tasks`` that keeps every owed task (see QueueStore.trim).
OWED_FLOOR = "owed"


def _gen_file(root: LogDirectory, queue: str) -> str:
    return os.path.join(root.root, "pipeline", f"{queue}.journal-gen")


def _journal_name(queue: str, gen: int) -> str:
    return f"{queue}.journal" if gen == 0 else f"{queue}.journal.{gen}"


def _read_gen(path: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise LogError(f"unreadable journal generation file {path}: {exc}") from exc


def ensure_journal(root: LogDirectory, queue: str) -> None:
    """Create the queue's (empty) journal when it has none, before anything writes its
    ``.tasks`` without a producer (a redrive from the command line): a task log with records
    and no journal is what a deleted journal looks like (QueueStore refuses to open it).

    Raises:
        LogError: the journal cannot be created (e.g. LogLocked: a producer runs).
    """
    name = _journal_name(queue, _read_gen(_gen_file(root, queue)))
    if not os.path.isdir(root.path_for(name)):
        Log.open(root.path_for(name)).close()


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
                 compact_after: int = COMPACT_AFTER, *, accept_loss: bool = False) -> None:
        self.queue = queue
        self.root = pipeline_root(data_dir)
        self.compact_after = compact_after
        # A damaged record costs a count, not the queue (journal facts are idempotent; a
        # damaged task record is a lost task, counted and warned about by the log).
        self._cfg = LogConfig(fsync=fsync or FsyncPolicy.interval(10.0), corruption="skip")
        # .tasks keeps only segments holding an owed task: retention would delete every
        # closed segment (max_bytes 0) but the "owed" floor (the lowest owed id, moved by
        # trim()) keeps those at or after it, with no cap and no expiry.
        self._tasks_cfg = LogConfig(
            fsync=self._cfg.fsync, corruption="skip", segment_bytes=TASKS_SEGMENT_BYTES,
            retention=Retention(max_bytes=0), floor_ttl_s=None, floor_max_bytes=None)
        self._gen_file = _gen_file(self.root, queue)
        self.gen = _read_gen(self._gen_file)
        tasks_path = self.root.path_for(f"{queue}.tasks")
        journal_path = self.root.path_for(self._journal_name(self.gen))
        tasks_existed = os.path.isdir(tasks_path)
        journal_existed = os.path.isdir(journal_path)
        self.tasks: Log = self.root.open(f"{queue}.tasks", self._tasks_cfg)
        # Until recovery knows better, nothing may be deleted (an older version had no floor).
        floors = self.tasks.retention_floors
        self.tasks.set_retention_floor(OWED_FLOOR, floors.get(OWED_FLOOR, 0))
        self.journal_bytes = 0  # written since the last snapshot (see compact_online)
        try:
            self.journal: Log = self.root.open(self._journal_name(self.gen), self._cfg)
        except BaseException:
            self.tasks.close()
            raise
        self.journal_missing = (not journal_existed and self.tasks.first_offset is not None)
        self.tasks_missing = (not tasks_existed and self.journal.first_offset is not None)
        if self.journal_missing or self.tasks_missing:
            if self.journal_missing:
                what = (f"its journal {journal_path} is missing while {tasks_path} holds "
                        f"{self.tasks.next_offset} task ids: every task would run again, "
                        "acked ones included")
            else:
                what = (f"its task log {tasks_path} is missing while the journal "
                        f"{journal_path} has records: every task still owed is lost")
            if not accept_loss:
                self.close()
                # Remove what this open created, so that the next open refuses again.
                shutil.rmtree(journal_path if self.journal_missing else tasks_path,
                              ignore_errors=True)
                raise QueueStateMissing(
                    f"work queue {queue}: {what}. Restore the missing directory from a backup, "
                    "or open the queue with accept_loss=True to go on (the loss is counted "
                    "in its stats)")
            log.error("work queue %s: %s; going on (accept_loss=True)", queue, what)

    def _journal_name(self, gen: int) -> str:
        return _journal_name(self.queue, gen)

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

        Facts about ids of a lost ``.tasks`` tail are dropped and those ids reported
        (:attr:`Recovered.lost_ranges`). Compacts the journal first when it is longer than
        ``compact_after`` records or holds facts of older ``.tasks`` epochs.
        """
        hist = self.tasks.epochs
        # Acked ids as one bit each over the ids .tasks still holds (a set of every acked id
        # took 315 MiB at 2 M tasks); acks of ids below its first offset are moot.
        acked = _Bits(self.tasks.first_offset or 0, self.tasks.next_offset)
        dead: set[int] = set()
        deliveries: dict[int, int] = {}
        history: dict[int, list[Attempt]] = {}
        low = 0  # ids below low are done unless in owed_below
        owed_below: set[int] = set()
        stale = 0
        lost_top: dict[int, int] = {}  # lost range start -> 1 + highest id named past it
        old_epochs = False
        current = self.tasks.epoch
        ends: dict[int, int | None] = {}

        def end_for(ep: int | None) -> int | None:
            # Facts under ep apply to ids below the result (None: to every id).
            nonlocal old_epochs
            if ep is None:
                return None
            if ep != current:
                old_epochs = True
            e = ends.get(ep, -1)
            if e == -1:
                e = ends[ep] = (hist.end_of(ep) if hist.knows(ep) else 0)
            return e

        def drop(end: int, tid: int) -> None:
            nonlocal stale
            stale += 1
            if tid + 1 > lost_top.get(end, 0):
                lost_top[end] = tid + 1

        for rec in self.journal.iter(0):
            try:
                j = msgpack.unpackb(rec.payload, raw=False)
                kind = j[0]
                if kind == J_DISPATCH:
                    end = end_for(j[3] if len(j) > 3 else None)
                    for tid, n in zip(j[1], j[2], strict=True):
                        if end is not None and tid >= end:
                            drop(end, tid)
                        elif n > deliveries.get(tid, 0):
                            deliveries[tid] = n
                elif kind == J_ACK:
                    end = end_for(j[2] if len(j) > 2 else None)
                    if end is None or not j[1] or max(j[1]) < end:
                        acked.add_all(j[1])
                    else:
                        for tid in j[1]:
                            if tid < end:
                                acked.add(tid)
                            else:
                                drop(end, tid)
                elif kind == J_FAIL:
                    end = end_for(j[3] if len(j) > 3 else None)
                    if end is not None and j[1] >= end:
                        drop(end, j[1])
                    else:
                        history.setdefault(j[1], []).append(attempt_from(j[2]))
                elif kind == J_DEAD:
                    end = end_for(j[2] if len(j) > 2 else None)
                    if end is not None and j[1] >= end:
                        drop(end, j[1])
                    else:
                        dead.add(j[1])
                elif kind == J_SNAPSHOT:
                    end = end_for(j[3] if len(j) > 3 else None)
                    low = int(j[1])
                    if end is not None and low > end:
                        drop(end, low - 1)
                        low = end
                    owed_below = {t for t in j[2] if t < low}
            except Exception:
                # A journal record we cannot read loses at most a count: the task stays owed.
                continue
        out = Recovered(next_id=self.tasks.next_offset)
        out.stale_facts = stale
        out.journal_corrupt_records = self.journal.stats().corrupt_records
        out.journal_missing = self.journal_missing
        out.tasks_missing = self.tasks_missing
        lost: list[tuple[int, int]] = list(self.tasks.lost_ranges)
        lost.extend((start, top) for start, top in lost_top.items() if top > start)
        out.lost_ranges = _merge(lost)
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
        out.tasks_corrupt_records = self.tasks.stats().corrupt_records
        if out.lost_ranges:
            log.warning("work queue %s: %d task id(s) in %s were recorded in the journal but "
                        "are no longer in its task log (an unsynced tail lost in a power cut, "
                        "or a deleted log): those tasks are lost; %d stale journal fact(s) "
                        "dropped, the ids now name new tasks", self.queue, out.lost_tasks,
                        out.lost_ranges, stale)
        if out.journal_corrupt_records or out.tasks_corrupt_records:
            log.warning("work queue %s: skipped %d damaged journal record(s) and %d damaged "
                        "task record(s); `mesh log repair` cuts the damage out", self.queue,
                        out.journal_corrupt_records, out.tasks_corrupt_records)
        self.trim(min((t[0] for t in out.tasks), default=out.next_id))
        # Also rewrite a journal with facts about a lost tail (so they are dropped once) or
        # facts of many old epochs (the EPOCHS file keeps the newest 1000 only).
        if (self.journal.next_offset > self.compact_after or (old_epochs and stale)
                or len(ends) > 100):
            self._compact(out)
        return out

    def trim(self, lowest_owed: int) -> None:
        """Let ``.tasks`` drop its segments wholly below ``lowest_owed`` (at its next roll).

        ``lowest_owed`` must be at most the lowest id still owed (or, with none owed, the next
        id the dispatcher has not seen); it never moves down."""
        cur = self.tasks.retention_floors.get(OWED_FLOOR, 0)
        if lowest_owed > cur:
            self.tasks.set_retention_floor(OWED_FLOOR, lowest_owed)
            self.tasks.enforce_retention()  # whole closed segments only: cheap

    def compact_online(self, next_id: int, owed: list[tuple[int, int, list[Attempt]]]) -> None:
        """Rewrite the journal as a snapshot while the producer runs: every id below
        ``next_id`` not in ``owed`` (``(id, deliveries, history)``) is done. The caller must
        have written every fact and dead letter of the ids it no longer lists first.

        Raises:
            LogError: the new generation could not be written (the old one stays in use).
        """
        rec = Recovered(tasks=[(tid, None, None, n, hist) for tid, n, hist in owed],
                        next_id=next_id)
        self._compact(rec)
        self.journal_bytes = 0
        self.trim(min((t[0] for t in owed), default=next_id))

    def _compact(self, rec: Recovered) -> None:
        new_gen = self.gen + 1
        name = self._journal_name(new_gen)
        old_path = self.root.path_for(self._journal_name(self.gen))
        new_path = self.root.path_for(name)
        shutil.rmtree(new_path, ignore_errors=True)  # a half-written earlier attempt
        new = self.root.open(name, self._cfg)
        try:
            owed = [t[0] for t in rec.tasks]
            ep = self.tasks.epoch
            recs = [msgpack.packb([J_SNAPSHOT, rec.next_id, owed, ep])]
            counted = [(t[0], t[3]) for t in rec.tasks if t[3]]
            if counted:
                recs.append(msgpack.packb(
                    [J_DISPATCH, [c[0] for c in counted], [c[1] for c in counted], ep]
                ))
            for t in rec.tasks:
                for att in t[4]:
                    recs.append(msgpack.packb([J_FAIL, t[0], att.to_dict(), ep],
                                              use_bin_type=True))
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


def journal_dispatch(sends: list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]],
                     epoch: int | None = None) -> bytes:
    """The ``D`` journal record of one dispatch pass (ids and delivery numbers), tagged with
    the ``.tasks`` writer ``epoch`` the ids belong to."""
    ids = [item[0] for _, items in sends for item in items]
    ns = [item[1] for _, items in sends for item in items]
    return msgpack.packb([J_DISPATCH, ids, ns, epoch])  # type: ignore[no-any-return]


def journal_records(
    dispatched: list[tuple[int, int]],
    acked: list[int],
    failed: list[tuple[int, Attempt]],
    dead: list[int],
    epoch: int | None = None,
) -> list[bytes]:
    """Encode one I/O-loop pass of dispatcher facts as journal records (batched), each tagged
    with the ``.tasks`` writer ``epoch`` its ids belong to."""
    out: list[bytes] = []
    pack = msgpack.packb
    if dispatched:
        out.append(pack([J_DISPATCH, [d[0] for d in dispatched], [d[1] for d in dispatched],
                         epoch]))
    if acked:
        out.append(pack([J_ACK, acked, epoch]))
    for tid, att in failed:
        out.append(pack([J_FAIL, tid, att.to_dict(), epoch], use_bin_type=True))
    for tid in dead:
        out.append(pack([J_DEAD, tid, epoch]))
    return out
