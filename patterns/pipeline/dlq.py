"""The dead-letter queue of a work queue: the stream ``<queue>.dlq`` and its operations.

A DLQ record (msgpack map, one per dead task) keeps the original task untouched (``payload``,
``key``, and ``trace``: the ``[traceparent, correlationid, causationid]`` it was pushed with,
or nil) with the facts of its death: ``reason`` (``max_deliveries`` / ``term``), the last
error's type, message and traceback, the delivery count, the retry history with times, the
queue, the producer's node id, and ``dead_at``. An entry's id is its first offset in
``<queue>.dlq``; a record copied forward by compaction carries that id as ``id`` (a record
without ``id`` has the id of its own offset), so ids never change.

Logs are append-only, so operations on DLQ entries are records of a second stream,
``<queue>.dlq-ops``: ``discard``, ``redrive_requested`` and ``redriven`` (with the new task
id), each naming the entry id. An entry's status is its last operation. Redrive pushes the
original task again as a new task (a new id, delivery count 0, the original trace context):
directly into ``<queue>.tasks`` when no producer runs (it runs when a producer next starts),
or, when a producer holds the queue, as a ``redrive_requested`` record that the running
producer picks up within about a second and fulfils.

Index and compaction: :class:`DeadLetters` keeps an index (entry id -> record offset, status,
operations) built once by one scan and then updated incrementally from the two streams' new
records, so ``show``/``redrive``/``discard`` cost O(1) reads, not a scan. A running producer
does that work on the process's one DLQ thread (:data:`DLQ_THREAD`), never on the queue's I/O
thread, and compacts: when resolved entries (redriven / discarded) outnumber the live ones
(and at least ``compact_min``), it copies the live records forward (fsynced), then deletes the
whole segments below them (a retention floor ``dlq-live`` on both streams keeps everything above),
so disk use follows the live entries, not history. Both streams use small segments
(:data:`DLQ_SEGMENT_BYTES`, :data:`OPS_SEGMENT_BYTES`) so whole segments can go.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.errors import ClosedError, ConfigError, DLQEntryNotFound, LogError, LogLocked
from mesh.log import FsyncPolicy, Log, LogConfig, LogDirectory, Retention

from .dispatch import Attempt, DeadLetter
from .store import attempt_from, encode_task, ensure_journal, pipeline_root

_log = logging.getLogger(__name__)

DLQ_VERSION = 1

#: Statuses of a DLQ entry.
DEAD = "dead"
DISCARDED = "discarded"
REDRIVEN = "redriven"
REDRIVE_REQUESTED = "redrive_requested"

_LIVE = (DEAD, REDRIVE_REQUESTED)
_OP_STATUS = {"discard": DISCARDED, "redriven": REDRIVEN, "redrive_requested": REDRIVE_REQUESTED}

#: Segment sizes of ``<queue>.dlq`` and ``<queue>.dlq-ops`` (compaction frees whole segments).
DLQ_SEGMENT_BYTES = 1 << 20
OPS_SEGMENT_BYTES = 64 << 10
#: The retention floor (on both streams) below which compaction has left nothing needed.
FLOOR = "dlq-live"
#: Resolved entries before a running producer compacts (and they must outnumber live ones).
COMPACT_MIN = 1000
#: Test hook: SIGKILL this process at that step of :meth:`DeadLetters.compact` (``copied``:
#: live records appended, not yet fsynced; ``trimmed``: DLQ segments deleted, ops not yet;
#: ``ops``: ops segments deleted, before closing) to prove every crash point is safe.
KILL_IN_COMPACTION_ENV = "ZEROMESH_DLQ_TEST_KILL_IN_COMPACTION"

Trace = tuple[str | None, str | None, str | None]
_List = list  # DeadLetters.list shadows the builtin in its class body


def dlq_stream(queue: str) -> str:
    """The stream name of ``queue``'s dead letters."""
    return f"{queue}.dlq"


def ops_stream(queue: str) -> str:
    """The stream name recording operations on ``queue``'s dead letters."""
    return f"{queue}.dlq-ops"


def _config(segment_bytes: int, fsync: FsyncPolicy | None = None) -> LogConfig:
    # Retention would drop every sealed segment; the FLOOR (set before any append) keeps all
    # from the lowest record still needed: only compaction moves it up.
    # A damaged record is skipped and counted by the log (stats), never a stall.
    return LogConfig(fsync=fsync or FsyncPolicy.interval(10.0), segment_bytes=segment_bytes,
                     retention=Retention(max_records=1), keep_past_floors=True,
                     floor_ttl_s=None, floor_max_bytes=None, corruption="skip")


def _guard(lg: Log) -> Log:
    if FLOOR not in lg.retention_floors:
        lg.set_retention_floor(FLOOR, lg.first_offset or 0)  # keep everything until compacted
    return lg


def open_dlq_log(root: LogDirectory, queue: str, fsync: FsyncPolicy | None = None) -> Log:
    """Open ``<queue>.dlq`` for writing (the producer), with the DLQ's segments and floor."""
    return _guard(Log.open(root.path_for(dlq_stream(queue)),
                           config=_config(DLQ_SEGMENT_BYTES, fsync)))


def encode_dead_letter(queue: str, producer: str, dl: DeadLetter, payload: bytes,
                       dead_at: float, trace: Trace | None = None) -> bytes:
    """Encode the DLQ record of ``dl`` (the original ``payload`` and trace kept as they were).

    The record's error fields are those of the last attempt that reported an error: a final
    delivery that timed out, or whose worker left, says nothing about why the task failed
    (every attempt is in ``history``).
    """
    last = next((a for a in reversed(dl.history) if a.error_type or a.error_message),
                dl.history[-1] if dl.history else None)
    rec = {
        "v": DLQ_VERSION,
        "queue": queue,
        "task_id": dl.task_id,
        "key": dl.key,
        "payload": payload,
        "trace": None if trace is None else list(trace),
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
        offset: the entry's id (its first position in ``<queue>.dlq``; for show / redrive /
            discard; compaction keeps it).
        task_id: the task's id in ``<queue>.tasks`` when it died.
        payload: the original task payload, untouched.
        trace: ``(traceparent, correlationid, causationid)`` the task was pushed with, or None;
            a redrive pushes the task again with it.
        status: ``dead``, ``discarded``, ``redriven`` or ``redrive_requested``.
        ops: the operations recorded on this entry, oldest first.
        redriven_task_id: after :meth:`DeadLetters.redrive`, the new task's id (None while
            only requested).
        producer_running: after :meth:`DeadLetters.redrive`, whether a producer of the queue
            was running (False: the task waits in ``<queue>.tasks`` until a producer starts).
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
    trace: Trace | None = None
    redriven_task_id: int | None = None
    producer_running: bool | None = None

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
            "ops": self.ops, "traceparent": self.trace[0] if self.trace else None,
            "correlationid": self.trace[1] if self.trace else None,
        }


def _unpack(offset: int, buf: bytes) -> dict[str, Any]:
    try:
        m = msgpack.unpackb(buf, raw=False)
        if not isinstance(m, dict) or not isinstance(m.get("payload"), bytes):
            raise ValueError("not a map with a payload")
        return m
    except Exception as exc:
        raise LogError(f"DLQ record at offset {offset} is not readable: {exc}") from exc


def _decode_entry(offset: int, buf: bytes) -> DLQEntry:
    m = _unpack(offset, buf)
    try:
        t = m.get("trace")
        trace: Trace | None = None
        if isinstance(t, list) and len(t) == 3 and all(x is None or type(x) is str for x in t):
            trace = (t[0], t[1], t[2])
        return DLQEntry(
            offset=int(m.get("id", offset)), queue=str(m.get("queue", "")),
            task_id=int(m["task_id"]), key=m.get("key"), payload=m["payload"],
            reason=str(m.get("reason", "")),
            error_type=m.get("error_type"), error_message=m.get("error_message"),
            traceback=m.get("traceback"), deliveries=int(m.get("deliveries", 0)),
            history=[attempt_from(a) for a in m.get("history") or []],
            dead_at=float(m.get("dead_at", 0.0)), producer=str(m.get("producer", "")),
            trace=trace,
        )
    except Exception as exc:
        raise LogError(f"DLQ record at offset {offset} is not readable: {exc}") from exc


def _open_retrying(path: str, timeout: float = 5.0) -> Log:
    # The ops stream is opened briefly by whoever records an operation (producer, CLI): on a
    # clash, wait for the other writer rather than fail.
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _guard(Log.open(path, config=_config(OPS_SEGMENT_BYTES)))
        except LogLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)  # waiting for another process's short critical section


def _files_sig(path: str) -> tuple[Any, ...] | None:
    # (name, size, mtime) of a log directory's segment files: changes with every append.
    try:
        with os.scandir(path) as it:
            return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e in it
                                if e.name.endswith(".log") for st in (e.stat(),)))
    except FileNotFoundError:
        return None


def _maybe_die(step: str) -> None:
    if os.environ.get(KILL_IN_COMPACTION_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class _Slot:
    __slots__ = ("ops", "pos", "status")

    def __init__(self, pos: int) -> None:
        self.pos = pos  # offset of the entry's newest record in <queue>.dlq
        self.status = DEAD
        self.ops: list[dict[str, Any]] = []


class DeadLetters:
    """Read and operate on the DLQ of ``queue`` in a node data directory.

    Usable with no producer running (the CLI) and beside a running producer. Thread-safe
    (one lock). The index is built at the first call and then follows the streams.

    Args:
        data_dir: the node's data directory.
        queue: the queue name.
        push: how to push a redriven task ``(payload, key, trace) -> id``; given by a running
            :class:`WorkQueue`. When None, redrive appends to ``<queue>.tasks`` itself, or
            records a request for the running producer when that log is locked.
        log: the running producer's writer of ``<queue>.dlq`` (enables :meth:`compact`).
        durable: makes the tasks ``push`` appended durable (fsync), called before a redrive is
            recorded.
        compact_min: resolved entries before :meth:`maybe_compact` compacts.
    """

    def __init__(self, data_dir: str | os.PathLike[str], queue: str, *,
                 push: Callable[[bytes, Hashable | None, Trace | None], int] | None = None,
                 actor: str = "api", log: Log | None = None,
                 durable: Callable[[], None] | None = None,
                 compact_min: int = COMPACT_MIN) -> None:
        self.root = pipeline_root(data_dir)
        self.queue = queue
        self._push = push
        self.actor = actor
        self._log = log
        self._durable = durable
        self.compact_min = compact_min
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self._requested: set[int] = set()
        self._dlq_next = 0  # next <queue>.dlq offset to index
        self._ops_next = 0  # next <queue>.dlq-ops offset to apply
        self.compactions = 0  # compactions run by this object
        #: DLQ records that could not be decoded (skipped with a warning; see ``mesh log
        #: verify`` for damage the log itself found).
        self.unreadable = 0
        self._resolved = 0  # entries in the index that are redriven or discarded
        self._ops_sig: tuple[Any, ...] | None = None  # the ops files as last read
        # Records ever copied forward by compaction: copies_total of the newest "compacted"
        # op (which covers the DLQ below its dlq_end) + the copies found past dlq_end.
        self._copies_base = 0
        self._copies_end = 0
        self._copy_offsets: _List[int] = []  # offsets of records with "id" at >= _copies_end
        self._compacted_seq: int | None = None  # ops offset of the newest "compacted" record
        self.root.path_for(dlq_stream(queue))  # validates the name

    # -- the index ------------------------------------------------------------------------
    def _dlq_reader(self) -> Log | None:
        if self._log is not None:
            return self._log
        path = self.root.path_for(dlq_stream(self.queue))
        if not os.path.isdir(path):
            return None
        return Log.open(path, readonly=True, config=_config(DLQ_SEGMENT_BYTES))

    def _refresh(self) -> None:
        """Index the records appended to both streams since the last call."""
        for attempt in range(3):
            try:
                self._refresh_once()
                return
            except LogError:
                # A reader beside a compacting producer can meet a segment deleted under it:
                # start the index again.
                if attempt == 2 or self._log is not None:
                    raise
                self._slots, self._requested = {}, set()
                self._dlq_next = self._ops_next = self.unreadable = self._resolved = 0
                self._ops_sig = None
                self._copies_base = self._copies_end = 0
                self._copy_offsets = []

    def _refresh_once(self) -> None:
        lg = self._dlq_reader()
        if lg is not None:
            try:
                if lg.next_offset > self._dlq_next:
                    for r in lg.iter(self._dlq_next):
                        self._dlq_next = r.offset + 1
                        try:
                            m = _unpack(r.offset, r.payload)
                            eid = int(m.get("id", r.offset))
                        except (LogError, TypeError, ValueError) as exc:
                            self.unreadable += 1  # counted, skipped: the others stay usable
                            _log.warning("queue %s: %s (skipped)", self.queue, exc)
                            continue
                        if "id" in m and r.offset >= self._copies_end:
                            self._copy_offsets.append(r.offset)
                        slot = self._slots.get(eid)
                        if slot is None:
                            self._slots[eid] = _Slot(r.offset)
                        else:
                            slot.pos = r.offset
                        self._dlq_next = r.offset + 1
            finally:
                if lg is not self._log:
                    lg.close()
        path = self.root.path_for(ops_stream(self.queue))
        sig = _files_sig(path)
        if sig is None or sig == self._ops_sig:
            return  # no operation recorded since the last read: no open, no read
        ol = Log.open(path, readonly=True, config=_config(OPS_SEGMENT_BYTES))
        try:
            if ol.next_offset > self._ops_next:
                self._apply_ops(ol)
            self._ops_sig = sig
        finally:
            ol.close()

    def _apply_ops(self, ol: Log) -> None:
        for r in ol.iter(self._ops_next):
            self._ops_next = r.offset + 1
            try:
                m = msgpack.unpackb(r.payload, raw=False)
            except Exception:
                continue
            if not isinstance(m, dict):
                continue
            m["seq"] = r.offset
            if m.get("op") == "compacted":
                self._copies_base = int(m.get("copies_total", 0))
                self._copies_end = int(m.get("dlq_end", 0))
                self._copy_offsets = [o for o in self._copy_offsets if o >= self._copies_end]
                self._compacted_seq = r.offset
                continue
            slot = self._slots.get(m.get("entry", -1))
            if slot is None:
                continue  # an entry compacted away
            slot.ops.append(m)
            was_live = slot.status in _LIVE
            slot.status = _OP_STATUS.get(str(m.get("op")), slot.status)
            self._resolved += was_live and slot.status not in _LIVE
            eid = int(m["entry"])
            if slot.status == REDRIVE_REQUESTED:
                self._requested.add(eid)
            else:
                self._requested.discard(eid)

    def _read(self, eid: int, slot: _Slot, lg: Log) -> DLQEntry:
        recs = lg.read(slot.pos, 1)
        if not recs or recs[0].offset != slot.pos:
            raise LogError(f"DLQ record at offset {slot.pos} of {self.queue!r} is missing")
        e = _decode_entry(slot.pos, recs[0].payload)
        e.offset = eid
        e.status = slot.status
        e.ops = list(slot.ops)
        return e

    def _entries(self, ids: Iterable[int]) -> list[DLQEntry]:
        lg = self._dlq_reader()
        if lg is None:
            return []
        try:
            return [self._read(i, self._slots[i], lg) for i in ids]
        finally:
            if lg is not self._log:
                lg.close()

    # -- reading --------------------------------------------------------------------------
    def ops(self) -> list[dict[str, Any]]:
        """Every operation still held in the ops stream, oldest first."""
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

    def list(self, *, include_all: bool = False) -> _List[DLQEntry]:
        """Dead letters by id; by default only those still ``dead`` or ``redrive_requested``
        (``include_all``: also the resolved ones not yet compacted away)."""
        with self._lock:
            self._refresh()
            ids = sorted(i for i, s in self._slots.items()
                         if include_all or s.status in _LIVE)
            return self._entries(ids)

    def counts(self) -> dict[str, int]:
        """Entries held per status (from the index: no record is read)."""
        with self._lock:
            self._refresh()
            out = {DEAD: 0, REDRIVE_REQUESTED: 0, REDRIVEN: 0, DISCARDED: 0}
            for s in self._slots.values():
                out[s.status] += 1
            return out

    def show(self, offset: int) -> DLQEntry:
        """One entry with its history and operations (one record read).

        Raises:
            DLQEntryNotFound: no entry ``offset`` (or it was resolved and compacted away).
        """
        with self._lock:
            self._refresh()
            if offset not in self._slots:
                raise DLQEntryNotFound(self.queue, offset)
            return self._entries([offset])[0]

    # -- operations -----------------------------------------------------------------------
    def _record(self, ops: _List[dict[str, Any]]) -> None:
        now = time.time()
        for op in ops:
            op.setdefault("at", now)
            op.setdefault("by", self.actor)
        log = _open_retrying(self.root.path_for(ops_stream(self.queue)))
        try:
            if log.next_offset > self._ops_next:
                self._apply_ops(log)  # another process's operations first
            log.append_many([msgpack.packb(op, use_bin_type=True) for op in ops])
            self._apply_ops(log)
        finally:
            log.close()

    def _live(self, offsets: Iterable[int]) -> _List[int]:
        out = []
        for o in offsets:
            s = self._slots.get(o)
            if s is None:
                raise DLQEntryNotFound(self.queue, o)
            if s.status not in _LIVE:
                raise ConfigError(f"dead letter {o} of {self.queue!r} is already {s.status}")
            out.append(o)
        return out

    def discard(self, offset: int) -> DLQEntry:
        """Mark an entry discarded (recorded; compaction removes it later).

        Raises:
            DLQEntryNotFound: no entry at ``offset``.
            ConfigError: the entry was already discarded or redriven.
        """
        return self.discard_many([offset])[0]

    def discard_many(self, offsets: Iterable[int]) -> _List[DLQEntry]:
        """:meth:`discard` several entries with one operations write (all or none checked
        first)."""
        with self._lock:
            self._refresh()
            ids = self._live(offsets)
            self._record([{"op": "discard", "entry": o} for o in ids])
            return self._entries(ids)

    def redrive(self, offset: int) -> DLQEntry:
        """Push the entry's original task back onto the queue as a new task; recorded.

        The new task has a new id, delivery count 0 and the original trace context. Returns
        the entry with status ``redriven`` (pushed now: ``producer_running`` tells whether a
        producer will dispatch it now or when it next starts) or ``redrive_requested`` (a
        running producer in another process holds the queue and pushes it within about a
        second).

        Raises:
            DLQEntryNotFound: no entry at ``offset``.
            ConfigError: the entry was already discarded or redriven.
        """
        return self.redrive_many([offset])[0]

    def redrive_many(self, offsets: Iterable[int]) -> _List[DLQEntry]:
        """:meth:`redrive` several entries (checked first, then pushed in order)."""
        with self._lock:
            self._refresh()
            ids = self._live(offsets)
            entries = self._entries(ids)
            if self._push is not None:
                ops: _List[dict[str, Any]] = []
                try:
                    for e in entries:
                        e.redriven_task_id = self._push(e.payload, e.key, e.trace)
                        e.producer_running = True
                        ops.append({"op": "redriven", "entry": e.offset,
                                    "task_id": e.redriven_task_id})
                finally:
                    if ops:  # what was pushed is recorded even if a later push failed
                        if self._durable is not None:
                            self._durable()  # the new tasks survive a power cut before the op
                        self._record(ops)
                return self._reread(entries)
            try:
                ensure_journal(self.root, self.queue)
                tasks = Log.open(self.root.path_for(f"{self.queue}.tasks"), config=LogConfig())
            except LogLocked:
                new: _List[dict[str, Any]] = [{"op": "redrive_requested", "entry": e.offset}
                       for e in entries if e.status != REDRIVE_REQUESTED]
                if new:
                    self._record(new)
                out = self._reread(entries)
                for e in out:
                    e.producer_running = True
                return out
            try:
                # Under the queue's lock: check again (another CLI may just have redriven),
                # make the tasks durable, then record, so no redrive is done twice or lost.
                self._refresh()
                self._live(ids)
                new_ids = tasks.append_many([encode_task(e.key, e.payload, e.trace)
                                             for e in entries])
                tasks.flush()
                self._record([{"op": "redriven", "entry": e.offset, "task_id": t}
                              for e, t in zip(entries, new_ids, strict=True)])
            finally:
                tasks.close()
            out = self._reread(entries)
            for e, t in zip(out, new_ids, strict=True):
                e.redriven_task_id, e.producer_running = t, False
            return out

    def _reread(self, entries: _List[DLQEntry]) -> _List[DLQEntry]:
        for e in entries:
            s = self._slots[e.offset]
            e.status, e.ops = s.status, list(s.ops)
            if e.redriven_task_id is None and s.ops and s.ops[-1].get("op") == "redriven":
                e.redriven_task_id = s.ops[-1].get("task_id")
        return entries

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

        Reads only the operations recorded since the last call (the index follows them).
        """
        with self._lock:
            self._refresh()
            if not self._requested or self._push is None:
                return 0
            ids = sorted(self._requested)
            self.redrive_many(ids)
            return len(ids)

    # -- compaction -----------------------------------------------------------------------
    def maybe_compact(self) -> int:
        """(Producer side) :meth:`compact` when resolved entries are at least
        ``compact_min`` and outnumber the live ones; returns entries removed."""
        with self._lock:
            self._refresh()
            resolved = self._resolved
            if resolved < self.compact_min or resolved <= len(self._slots) - resolved:
                return 0
            return self.compact()

    def compact(self) -> int:
        """(Producer side) drop resolved entries from disk: copy live records forward
        (fsynced), then delete whole segments of both streams below what is still needed.
        Returns how many resolved entries left the index.

        Raises:
            ConfigError: no producer's writer of the DLQ (``log``) was given.
        """
        if self._log is None:
            raise ConfigError("DLQ compaction runs in the queue's producer")
        lg = self._log
        with self._lock:
            self._refresh()
            # Everything at or after cut is either copied now or not yet indexed: kept.
            cut = self._dlq_next
            live = sorted((s.pos, i) for i, s in self._slots.items() if s.status in _LIVE)
            for k in range(0, len(live), 500):
                chunk = live[k:k + 500]
                recs = []
                for pos, eid in chunk:
                    got = lg.read(pos, 1)
                    m = _unpack(pos, got[0].payload)
                    m["id"] = eid
                    recs.append(msgpack.packb(m, use_bin_type=True))
                lg.append_many(recs)
            # Index the copies (and any dead letter the I/O thread appended meanwhile).
            self._refresh()
            _maybe_die("copied")
            lg.flush(sync=True)  # the copies are durable before the originals can go
            ol = _open_retrying(self.root.path_for(ops_stream(self.queue)))
            try:
                if ol.next_offset > self._ops_next:
                    self._apply_ops(ol)
                # Every copy so far, durable before any record can go: total() stays exact
                # whatever step a crash interrupts (copies past dlq_end are counted at open).
                ol.append(msgpack.packb({"op": "compacted", "copies_total": self._copies(),
                                         "dlq_end": self._dlq_next, "at": time.time(),
                                         "by": self.actor}, use_bin_type=True))
                ol.flush()
                self._apply_ops(ol)
                lg.set_retention_floor(FLOOR, cut)
                lg.enforce_retention()
                _maybe_die("trimmed")
                first = lg.first_offset
                gone = [i for i, s in self._slots.items()
                        if s.status not in _LIVE and (first is None or s.pos < first)]
                for i in gone:
                    del self._slots[i]
                self._resolved -= len(gone)
                needed = [op["seq"] for s in self._slots.values() for op in s.ops]
                if self._compacted_seq is not None:
                    needed.append(self._compacted_seq)
                ol.set_retention_floor(FLOOR, min(needed, default=self._ops_next))
                ol.enforce_retention()
                _maybe_die("ops")
            finally:
                ol.close()
            self.compactions += 1
            return len(gone)

    def total(self) -> int:
        """Tasks dead-lettered ever (DLQ records, less the copies compaction made)."""
        with self._lock:
            self._refresh()
            return self._dlq_next - self._copies()

    def _copies(self) -> int:
        return self._copies_base + sum(1 for o in self._copy_offsets if o >= self._copies_end)

    def disk_bytes(self) -> int:
        """Bytes of both DLQ streams on disk."""
        total = 0
        for name in (dlq_stream(self.queue), ops_stream(self.queue)):
            path = self.root.path_for(name)
            if os.path.isdir(path):
                for f in os.listdir(path):
                    try:
                        total += os.path.getsize(os.path.join(path, f))
                    except OSError:
                        continue
        return total


    def tick(self) -> None:
        """(Producer side) one round of background work: fulfil redrive requests recorded by
        other processes, then compact if due. Run by the process's DLQ thread."""
        self.fulfil_requests()
        self.maybe_compact()


#: Seconds between two rounds of the DLQ thread (redrive requests are fulfilled within this).
TICK_S = 1.0


class _DlqThread:
    """One thread per process does the DLQ work of every running producer (bounded threads
    with thousands of queues), off their I/O threads. Exits when no producer is left."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._items: dict[int, DeadLetters] = {}
        self._busy: DeadLetters | None = None
        self._thread: threading.Thread | None = None

    def add(self, d: DeadLetters) -> None:
        with self._cv:
            self._items[id(d)] = d
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipe-dlq", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def remove(self, d: DeadLetters) -> None:
        """Stop serving ``d``; returns once no round is running on it."""
        with self._cv:
            self._items.pop(id(d), None)
            self._cv.notify_all()  # an idle thread exits now
            while self._busy is d:
                self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._items:
                    self._thread = None
                    return
                items = list(self._items.values())
            start = time.monotonic()
            for d in items:
                with self._cv:
                    if id(d) not in self._items:
                        continue
                    self._busy = d
                try:
                    d.tick()
                except ClosedError:
                    pass  # its queue is closing
                except Exception:
                    _log.exception("queue %s: DLQ work failed", d.queue)
                finally:
                    with self._cv:
                        self._busy = None
                        self._cv.notify_all()
            with self._cv:
                self._cv.wait(max(0.05, TICK_S - (time.monotonic() - start)))


DLQ_THREAD = _DlqThread()
