"""Replicated streams: a node that keeps durable copies of other nodes' streams and serves them.

``Store(node, topics=("sensors.",))`` follows every durable stream matching a topic of every
publisher it finds (a :class:`~patterns.pubsub.subscriber.Subscriber` underneath, so catch-up,
gap repair and writer epochs are the subscriber's), keeps one log per (origin, stream) in
``<data_dir>/replicas/<origin>/streams/<stream>/`` holding the origin's envelopes byte for byte,
fsyncs, and then acks ``pubsub.replicated`` to the origin (``sync="write"``, opt-in: acks once
written, before the fsync). It answers ``pubsub.fetch`` (a
replay request naming the origin) in the reply format of the origin itself, and
``pubsub.holdings_req`` (which origin streams, which seqs). Design: docs/architecture.md,
"Replicated streams"; wire: docs/protocol.md, "Replicated streams".

The log's offsets are the store's own; a ``REPLICA`` file beside the segments maps them to
the origin's seqs (runs) and keeps the origin's epoch history as seen by the store. It is
replaced atomically and fsynced before the first record of a new run or epoch is written.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.budget import Budget, LogLimiter
from mesh.envelope import peek
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    LogCorruptedRange,
    LogError,
    MeshError,
    OffsetOutOfRange,
    ProtocolError,
)
from mesh.log import LogConfig, LogDirectory
from mesh.log.epochs import EpochHistory
from mesh.log.log import CLOCK_SKEW_NS
from mesh.peers import PeerEventKind
from patterns._closing import close_with
from patterns._metrics import attach, store_collector
from patterns.pubsub import _registry, frames
from patterns.pubsub.gaps import Step, StreamTracker
from patterns.pubsub.holdings import board_for
from patterns.pubsub.subscriber import Start, Subscriber

__all__ = ["ReplicaMapDamaged", "Store", "StoreStats", "followed_topics", "read_holdings"]

_log = logging.getLogger("zeromesh.pubsub.store")

REPLICA_NAME = "REPLICA"
#: Where the ranges origins' new epochs took back are kept (``replicas/archive/``).
ARCHIVE_DIR = "archive"
#: Where copies whose map is damaged are moved (``replicas/aside/``), for the operator.
ASIDE_DIR = "aside"
_MAGIC = "zeromesh-replica"
_VERSION = 1
#: Acks of every replica are sent again this often (an origin that restarted learns them).
REACK_S = 1.0
#: The most records / envelope bytes one fetch answer carries.
MAX_FETCH_RECORDS = frames.REPLAY_MAX_RECORDS
MAX_FETCH_BYTES = frames.REPLAY_MAX_BYTES
#: The durable-subscription name a store's position is acked under (a retention floor).
ACK_NAME = "pubsub.store"
#: That position is sent with a replication ack at most this often per copy (and at every
#: reack): the replication ack itself goes after every fsync.
FLOOR_ACK_S = 0.01
#: When a copy is acked (``Store(sync=...)``): after its fsync, or once written (opt-in).
SYNC_MODES = ("fsync", "write")
#: A fetch of a peer whose connection is backed up is answered "busy", retry after this.
FETCH_RETRY_MS = 500
#: Fetch-answer bytes one peer may have unproven (sent, not yet echoed by a later request's
#: ``tok``) and all peers together: the publisher's replay budget, same rules
#: (docs/protocol.md, "Replay budget"). What one answer costs beyond its envelopes.
FETCH_PEER_BYTES = 32 << 20
FETCH_NODE_BYTES = 128 << 20
FETCH_REPLY_COST = 1024
FETCH_MIN_CHUNK = 64 << 10
#: ``pubsub.holdings_req`` one peer may send per second (each answers one page of up to
#: ``frames.MAX_HOLDINGS`` items); beyond that they are dropped (counted): the asker asks
#: again at its next round. At most HOLDINGS_SCAN copies are looked at for one page.
HOLDINGS_PEER_PAGES = 200
HOLDINGS_SCAN = 4 * frames.MAX_HOLDINGS
#: Copies looked at for one peer's holdings pages per second, over all its requests (what
#: a page costs the store is the copies it walks, not the request).
HOLDINGS_PEER_SCAN = 20_000

Key = tuple[str, str]  # (origin node id, stream)


@dataclass
class StoreStats:
    """Counters of a store (a snapshot).

    Attributes:
        replicas: (origin, stream) copies held.
        appended: envelopes written to replicas since start.
        acks: ``pubsub.replicated`` acks sent.
        fetches: ``pubsub.fetch`` requests answered with data or an empty chunk.
        fetch_events: envelopes sent in fetch answers.
        fetch_refused: fetches refused (unknown stream, forbidden, busy, malformed).
        fetch_busy: fetches answered ``"busy"`` (the peer's fetch budget was used up, or its
            connection is backed up).
        holdings_answers: ``pubsub.holdings_req`` answered (one page each).
        holdings_refused: ``pubsub.holdings_req`` malformed, or over the peer's budget
            (``HOLDINGS_PEER_PAGES`` requests, ``HOLDINGS_PEER_SCAN`` copies looked at, a
            second): not answered.
        rewinds: times an origin's new epoch took back seqs a replica held.
        archived: records kept in archives because a new epoch took them back, or a
            damaged part of the copy is copied again (:meth:`Store.archives`).
        damaged: copies found damaged at start (a bad ``REPLICA`` map: moved to
            ``replicas/aside/`` and copied again; damaged records: copied again from there).
        write_errors: replica writes that failed (disk full, I/O): asked for again.
    """

    replicas: int = 0
    appended: int = 0
    acks: int = 0
    fetches: int = 0
    fetch_events: int = 0
    fetch_refused: int = 0
    fetch_busy: int = 0
    holdings_answers: int = 0
    holdings_refused: int = 0
    rewinds: int = 0
    archived: int = 0
    damaged: int = 0
    write_errors: int = 0


#: How far an event's ``time`` may be from its UUIDv7 id's time and still be taken as the
#: origin's clock at publish (beyond: a ``time`` the application set, say a historical one).
_ID_TIME_SLACK_US = 100_000


def _uint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """A msgpack unsigned integer (or nil, as 0) at ``pos``: ``(value, next pos)``."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    if b == 0xC0:
        return 0, pos + 1
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(b)
    if width is None:
        return None
    return int.from_bytes(buf[pos + 1:pos + 1 + width], "big"), pos + 1 + width


def _str_at(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    b = buf[pos]
    if 0xA0 <= b <= 0xBF:
        n, pos = b & 0x1F, pos + 1
    elif b == 0xD9:
        n, pos = buf[pos + 1], pos + 2
    else:
        return None
    return buf[pos:pos + n], pos + n


def origin_time_ns(env: bytes) -> int | None:
    """The time an origin recorded envelope ``env`` at, as far as the envelope tells: the
    event's ``time`` when its UUIDv7 ``id`` was made within 100 ms of it (the publisher's
    clock at publish, what its log stamps the record with, to the µs), else the id's
    time (ms: the ``time`` is one the application chose, a historical one say, which the
    origin's log did not use either), else None (no UUIDv7 id: the store's clock, as the
    log's default). Only the envelope's first fields are read."""
    try:
        b0 = env[0]
        pos = 1 if b0 == 0x9F else 3 if env[:3] == b"\xdc\x00\x10" else -1
        if pos < 0 or env[pos] >= 0x80 or env[pos + 1] >= 0x80:
            return None
        got = _str_at(env, pos + 2)  # stream
        if got is None:
            return None
        seq = _uint(env, got[1])
        if seq is None:
            return None
        ident = _str_at(env, seq[1])
        if ident is None:
            return None
        t = _uint(env, ident[1])
        if t is None:
            return None
        raw = ident[0]
        if len(raw) != 36 or raw[14:15] != b"7":
            return None
        ms = int(raw[0:8] + raw[9:13], 16)
    except (IndexError, ValueError):
        return None
    return _pick_time(t[0], ms, _time_ceiling())


def _time_ceiling() -> int:
    return time.time_ns() + CLOCK_SKEW_NS


def _pick_time(us: int, ms: int, ceiling: int) -> int:
    """The record time of an event of ``time`` ``us`` whose id was made at ``ms``: its time
    when the id agrees; else the id's (an application-set time), unless the id runs ahead of
    any clock while the time does not (an origin whose clock jumped forward and back keeps
    minting ids at the forward time: its log stamped the append at about ``time``)."""
    if abs(us - ms * 1000) <= _ID_TIME_SLACK_US:
        return us * 1000
    if ms * 1_000_000 > ceiling and us * 1000 <= ceiling:
        return us * 1000
    return ms * 1_000_000


def _map_crc(meta: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


class ReplicaMapDamaged(LogError):
    """A replica's ``REPLICA`` map cannot be read or makes no sense (a flipped byte, a cut
    file). The store moves that copy aside and copies the stream again."""


def origin_times_ns(envs: list[bytes]) -> list[int | None]:
    """:func:`origin_time_ns` of each envelope; envelopes laid out like the first one (same
    stream, same width of seq: one stream's batch) are read at its offsets directly."""
    out: list[int | None] = []
    lay: tuple[bytes, int, int, int] | None = None  # (prefix, seq type pos, id pos, time pos)
    ceiling = _time_ceiling()
    for env in envs:
        if lay is not None:
            prefix, spos, ipos, tpos = lay
            if env.startswith(prefix) and env[spos] == prefix[-1] and len(env) > tpos + 8 \
                    and env[ipos] == 0xD9 and env[ipos + 1] == 36 and env[tpos] == 0xCF \
                    and env[ipos + 16] == 0x37:  # a UUIDv7 id, a uint64 time
                raw = env[ipos + 2:ipos + 38]
                ms = int(raw[0:8] + raw[9:13], 16)
                us = int.from_bytes(env[tpos + 1:tpos + 9], "big")
                out.append(us * 1000 if abs(us - ms * 1000) <= _ID_TIME_SLACK_US
                           else _pick_time(us, ms, ceiling))
                continue
        out.append(origin_time_ns(env))
        lay = _layout(env)
    return out


def _layout(env: bytes) -> tuple[bytes, int, int, int] | None:
    """Where the seq type, id and time of ``env`` are (None: not the common layout)."""
    try:
        pos = 1 if env[0] == 0x9F else -1
        if pos < 0 or env[1] >= 0x80 or env[2] >= 0x80:
            return None
        got = _str_at(env, 3)
        if got is None:
            return None
        spos = got[1]
        seq = _uint(env, spos)
        if seq is None:
            return None
        ipos = seq[1]
        if env[ipos] != 0xD9 or env[ipos + 1] != 36:
            return None
        tpos = ipos + 38
        return env[:spos + 1], spos, ipos, tpos
    except IndexError:
        return None


class _Replica:
    """One (origin, stream) copy: a log plus the runs map and the origin's epoch history.

    ``runs`` are ``[seq, local, count]``: origin seqs ``seq..seq+count-1`` are local offsets
    ``local..``; the last run's count is open (it grows with the log: stored as -1). Guarded
    by ``lock`` (the follower thread appends, the reactor thread reads).
    """

    def __init__(self, root: Path, origin: str, stream: str, config: LogConfig) -> None:
        self.origin = origin
        self.stream = stream
        self.lock = threading.RLock()
        self.log = LogDirectory(root / origin).open(stream, config)
        self.path = self.log.path
        self.runs: list[list[int]] = []
        self.epochs: list[tuple[int, int]] = []
        self._load()

    # -- the REPLICA file -----------------------------------------------------------------

    def _load(self) -> None:
        fp = os.path.join(self.path, REPLICA_NAME)
        try:
            with open(fp, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            if self.log.first_offset is not None:
                # Records without a map cannot be served (their seqs are unknown): start the
                # copy again after them rather than guess.
                _log.warning("store: %s has records but no %s; they are not served",
                             self.path, REPLICA_NAME)
            return
        except (OSError, ValueError) as exc:
            raise ReplicaMapDamaged(f"store: {fp} is unreadable: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("magic") != _MAGIC \
                or meta.get("v") != _VERSION:
            raise ReplicaMapDamaged(f"store: {fp} is not a replica map of version {_VERSION}")
        crc = meta.pop("crc", None)  # (a map written before maps had one has none)
        if crc is not None and crc != _map_crc(meta):
            raise ReplicaMapDamaged(f"store: {fp} fails its checksum")
        try:
            runs = [[int(a), int(b), int(c)] for a, b, c in meta.get("runs", [])]
            epochs = [(int(e), int(s)) for e, s in meta.get("epochs", [])]
        except (TypeError, ValueError) as exc:
            raise ReplicaMapDamaged(f"store: {fp} has a malformed run or epoch: {exc}") from exc
        if any(c < -1 or a < 0 or b < 0 for a, b, c in runs) or any(
                runs[i + 1][1] < runs[i][1] or runs[i + 1][0] < runs[i][0]
                for i in range(len(runs) - 1)):
            raise ReplicaMapDamaged(f"store: {fp} has runs out of order")
        self.epochs = epochs
        # The map is written before the records it maps: records that never reached the
        # disk (not fsynced, so never acked) are simply not held.
        nxt = self.log.next_offset
        for seq, local, count in runs:
            if local >= nxt:
                break  # (an empty last run maps nothing)
            if count >= 0 and local + count > nxt:
                count = nxt - local
            if count != 0:
                self.runs.append([seq, local, count])
        # Likewise an epoch whose first record never landed is not one this copy holds.
        head = self.head
        self.epochs = [e for e in self.epochs if head is not None and e[1] <= head]
        self._check_runs()

    def _check_runs(self) -> None:
        """Each run's first and last record must carry the seq the map gives it (the
        envelopes name their seq): a map that disagrees with the log is not believed."""
        for i, (seq, local, _count) in enumerate(self.runs):
            end = self._run_end(i)
            for s, off in ((seq, local), (end - 1, local + end - 1 - seq)):
                try:
                    _first, got = self.log.read_batch_payloads(off, 1)
                    at = peek(got[0])[1] if got else None
                except (LogError, MeshError):
                    continue  # a damaged record: first_damaged() says so
                if at != s:
                    raise ReplicaMapDamaged(f"store: {self.path}: the map puts seq {s} at "
                                            f"offset {off}, the record there is seq {at}")

    def _save(self) -> None:
        fp = os.path.join(self.path, REPLICA_NAME)
        tmp = fp + ".tmp"
        meta = {"magic": _MAGIC, "v": _VERSION, "origin": self.origin,
                "stream": self.stream, "runs": self.runs,
                "epochs": [list(e) for e in self.epochs]}
        meta["crc"] = _map_crc(meta)
        body = json.dumps(meta)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fp)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def holes(self) -> list[tuple[int, int]]:
        """The seq ranges ``(start, end)`` between the first and the last seq held that this
        copy does not hold (the source no longer had them when the copy was made)."""
        with self.lock:
            return [(self._run_end(i), self.runs[i + 1][0]) for i in range(len(self.runs) - 1)
                    if self._run_end(i) < self.runs[i + 1][0]]

    def first_damaged(self) -> int | None:
        """The first origin seq held in a damaged part of the log (a record that fails its
        checks, found when the log was opened), or None."""
        offs = [r.offset for seg in getattr(self.log, "_segs", ())
                for r in getattr(seg, "bad", {}).values()]
        if not offs:
            return None
        local = int(min(offs))
        with self.lock:
            for i, (seq, lo, _count) in enumerate(self.runs):
                end = self._run_end(i)
                if local < lo + (end - seq):
                    return seq + max(0, local - lo)
        return None

    # -- views (under lock) -----------------------------------------------------------------

    def _run_end(self, i: int) -> int:
        """One past the last origin seq of run ``i``."""
        seq, local, count = self.runs[i]
        if count < 0:
            count = self.log.next_offset - local
        return seq + count

    @property
    def head(self) -> int | None:
        """One past the last seq held (None: nothing held yet)."""
        with self.lock:
            return self._run_end(len(self.runs) - 1) if self.runs else None

    @property
    def oldest(self) -> int | None:
        """The first seq still held (the store's own retention may have removed older ones)."""
        with self.lock:
            first = self.log.first_offset
            if first is None or not self.runs:
                return None
            for i, (seq, local, _count) in enumerate(self.runs):
                end = self._run_end(i)
                lo = seq + max(0, first - local)
                if lo < end:
                    return lo
            return None

    @property
    def epoch(self) -> int:
        """The origin's writer epoch of the last record held (0: none, or an old origin)."""
        return self.epochs[-1][0] if self.epochs else 0

    def history(self) -> EpochHistory:
        """The origin's epoch history as this replica saw it."""
        with self.lock:
            return EpochHistory(list(self.epochs))

    def locate(self, seq: int) -> tuple[int | None, int | None]:
        """``(local offset, records left in its run)`` of ``seq``, or ``(None, next)`` when
        the replica does not hold it: ``next`` is the first held seq above it (None: none)."""
        with self.lock:
            starts = [r[0] for r in self.runs]
            i = bisect.bisect_right(starts, seq) - 1
            if i >= 0 and seq < self._run_end(i):
                r = self.runs[i]
                return r[1] + seq - r[0], self._run_end(i) - seq
            nxt = self.runs[i + 1][0] if i + 1 < len(self.runs) else None
            return None, nxt

    # -- writing (follower thread) ----------------------------------------------------------

    def append(self, first: int, envs: list[bytes], epoch: int) -> None:
        """Append envelopes of origin seqs ``first..`` written under origin epoch ``epoch``.

        Raises:
            LogError: the write failed (nothing is acked then).
        """
        with self.lock:
            head = self.head
            if head is not None and first < head:
                envs = envs[head - first:]  # a repeat (the follower never sends one)
                first = head
            if not envs:
                return
            changed = False
            if head is None or first != head or self.runs[-1][2] >= 0:
                if self.runs and self.runs[-1][2] < 0:
                    last = self.runs[-1]  # the open run ends here
                    last[2] = self.log.next_offset - last[1]
                self.runs.append([first, self.log.next_offset, -1])
                changed = True
            if not self.epochs or self.epochs[-1][0] != epoch:
                self.epochs.append((epoch, first))
                changed = True
            if changed:
                self._save()  # durable before any record it maps
            try:
                # Each record keeps the origin's time (origin_time_ns), so Start.time finds
                # the same first event here as in the origin's log; one batch per time.
                stamps = origin_times_ns(envs)
                floor = self._stamp_floor()
                if floor is not None:
                    # An origin whose clock is far behind would have the store's age
                    # retention delete a copy just made: a stamp is never older than half
                    # the retention age (a future one the log passes over by itself).
                    stamps = [None if t is None else max(t, floor) for t in stamps]
                i = 0
                while i < len(envs):
                    j = i + 1
                    while j < len(envs) and stamps[j] == stamps[i]:
                        j += 1
                    self.log.append_many(envs[i:j], timestamp_ns=stamps[i])
                    i = j
            except BaseException:
                # Nothing of it was written: the new run (and epoch) map nothing. On disk
                # they are dropped at the next open (an empty run is never loaded).
                if self.runs and self.runs[-1][1] == self.log.next_offset:
                    self.runs.pop()
                if self.epochs and self.epochs[-1] == (epoch, first) and (
                        self.head is None or self.head <= first):
                    self.epochs.pop()
                raise

    def _stamp_floor(self) -> int | None:
        age = self.log.config.retention.max_age_s
        return None if age is None else time.time_ns() - int(age * 5e8)

    def rewind(self, to: int) -> None:
        """The origin's log no longer holds seqs ``to..`` (a new epoch took them back):
        forget them here too (the records stay in the log until retention)."""
        with self.lock:
            head = self.head
            if head is None or to >= head:
                return
            keep: list[list[int]] = []
            for i, (seq, local, _count) in enumerate(self.runs):
                if seq >= to:
                    break
                end = self._run_end(i)
                keep.append([seq, local, min(end, to) - seq])
            self.runs = keep
            self.epochs = [(e, min(s, to)) for e, s in self.epochs]
            self._save()  # every run kept is closed: the next append starts a new one

    def sync(self) -> None:
        """fsync what was appended.

        Raises:
            LogError: fsync failed.
        """
        self.log.flush(sync=True)

    # -- reading (reactor thread) -----------------------------------------------------------

    def read(self, seq: int, n: int) -> tuple[int, list[bytes]]:
        """Up to ``n`` contiguous envelopes from ``seq`` (one run at most).

        Raises:
            OffsetOutOfRange: ``seq`` is not held.
            LogError: the read failed.
        """
        local, left = self.locate(seq)
        if local is None:
            raise OffsetOutOfRange(seq, None, None)
        assert left is not None
        try:
            first, envs = self.log.read_batch_payloads(local, min(n, left))
        except LogCorruptedRange as exc:
            # The log's offsets are this copy's own: say the origin's seqs.
            nxt = exc.next_offset
            raise LogCorruptedRange(self.path, 0, str(exc), offset=seq,
                                    next_offset=None if nxt is None
                                    else seq + max(1, nxt - local)) from exc
        if first != local or len(envs) > left:
            raise LogCorruptedRange(self.path, 0, "records skipped", offset=seq,
                                    next_offset=seq + (first - local))
        return seq, envs

    def close(self) -> None:
        self.log.close()


class _Follower(Subscriber):
    """The store's subscriber: delivers envelopes to the replicas instead of decoding them.

    Its position per (origin, stream) is the replica's head; it keeps no cursor of its own.
    """

    def __init__(self, node: Any, topic: str, store: Store) -> None:
        self._owner_store = store
        self._gap_ok: dict[Key, int] = {}  # a skip at the source: the next run starts there
        super().__init__(node, topic, start=Start.beginning(), durable=None,
                         auto_commit=False, verify=False)

    def _add_self(self) -> None:
        self._self_info = self.node.info()  # the node's own streams are not replicated here

    def _new_tracker(self, key: Key, *, replayable: bool) -> StreamTracker:
        rep = self._owner_store._replica(key, create=False)
        head = rep.head if rep is not None else None
        if head is not None and rep is not None:
            self._positions[key] = head
            self._pos_epoch[key] = rep.epoch or None
        return super()._new_tracker(key, replayable=replayable)

    def _on_run(self, key: Key, first: int, epoch: int, run: frames.Run) -> None:
        # Every run the subscriber delivers comes here (live DATA in either layout, replay
        # and fetch chunks): the origin's envelopes are kept byte for byte, never decoded.
        payloads = frames.run_envelopes(run)
        entry = self._trackers.get(key)
        store = self._owner_store
        rep = store._replica(key, create=False)
        head = rep.head if rep is not None else None
        if head is not None and first > head and self._gap_ok.get(key) != first:
            ok = False  # after a failed write: never leave a hole, ask again from the head
        else:
            ok = store._append(key, first, payloads, epoch)
        self._gap_ok.pop(key, None)
        if not ok and entry is not None:
            rep = store._replica(key, create=False)
            head = rep.head if rep is not None else None
            tracker = entry[1]
            # What was not written is asked for again (from the copy's head), at once.
            tracker.expected = head if head is not None else first
            tracker._buffer.clear()
            # An answer still due for the old request would read as a skip at the source
            # from the new position (a hole): that request is abandoned, a new one is made.
            tracker._outstanding = None
            tracker.known_head = max(tracker.known_head, first + len(payloads))

    def _apply(self, key: Key, tracker: StreamTracker, step: Step) -> None:
        if step.epoch is not None:
            epoch, rewind_to, _lost = step.epoch
            self._trackers[key] = (epoch, tracker)
            if rewind_to is not None:
                self._owner_store._rewind(key, rewind_to)
        if step.skipped is not None:
            a, b = step.skipped
            self._gap_ok[key] = b  # the next run may start there: a hole at the source
            self._owner_store._logs.warning(
                f"gap:{key[0]}", "store: %s seqs %d..%d are not held (%s at the source)",
                key, a, b - 1, step.skip_reason)
        for first, payloads in step.deliver:
            self._on_run(key, first, tracker.epoch or 0, payloads)
        if step.ask is not None:
            self._send_ask(key, tracker, step.ask)


def read_holdings(data_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What the store of node directory ``data_dir`` holds, read-only (safe while it runs):
    one row per copy (``origin``, ``stream``, ``oldest``, ``head``, ``epoch``, ``records``,
    ``bytes``, ``missing``: the ``[start, end]`` seq ranges inside it not held; ``error`` instead for a copy that cannot be read), then one per archive
    (``archive``: its directory, ``epoch``, ``oldest``, ``head``)."""
    root = Path(data_dir) / "replicas"
    rows: list[dict[str, Any]] = []
    if not root.is_dir():
        return rows

    def one(base: Path, origin: str, stream: str) -> dict[str, Any]:
        row: dict[str, Any] = {"origin": origin, "stream": stream}
        try:
            lg = LogDirectory(base / origin).open(stream, readonly=True)
        except MeshError as exc:
            return {**row, "error": str(exc)}
        try:
            st = lg.stats()
            meta = json.loads((Path(lg.path) / REPLICA_NAME).read_text(encoding="utf-8"))
            runs = [[int(a), int(b), int(c)] for a, b, c in meta.get("runs", [])]
            epochs = meta.get("epochs", [])
        except (OSError, ValueError, TypeError) as exc:
            return {**row, "error": f"{REPLICA_NAME}: {exc}"}
        finally:
            lg.close()
        nxt, first = st.next_offset, st.first_offset
        head = oldest = None
        missing: list[list[int]] = []
        for seq, local, count in runs:
            n = (nxt - local) if count < 0 else min(count, max(0, nxt - local))
            if n <= 0:
                continue
            if first is not None and oldest is None and local + n > first:
                oldest = seq + max(0, first - local)
            if head is not None and seq > head:
                missing.append([head, seq])
            head = seq + n
        return {**row, "oldest": oldest if oldest is not None else head, "head": head,
                "epoch": int(epochs[-1][0]) if epochs else 0, "records": st.records,
                "bytes": st.bytes, "missing": missing}

    for d in sorted(root.iterdir()):
        if len(d.name) == 32 and not d.name.strip("0123456789abcdef"):
            rows.extend(one(root, d.name, s) for s in LogDirectory(d).streams())
    arch = root / ARCHIVE_DIR
    for d in sorted(arch.iterdir()) if arch.is_dir() else []:
        for od in sorted(x for x in d.iterdir() if x.is_dir()):
            for s in LogDirectory(od).streams():
                row = one(d, od.name, s)
                row["archive"] = str(od / "streams" / s)
                rows.append(row)
    return rows


def followed_topics(topics: Iterable[str]) -> tuple[str, ...]:
    """The topics a store follows for ``topics``: each one no other one covers, in order.

    A prefix topic (ending in ``.`` or ``*``; ``""`` is ``"*"``) covers every topic whose
    name or prefix starts with its own prefix; of two that cover each other (``"a."`` and
    ``"a.*"``, a repeat) the first is kept. Streams matching several given topics then match
    exactly one followed topic: one follower writes each copy.
    """
    parsed = []
    for t in topics:
        t = t or "*"
        prefix = t.endswith((".", "*"))
        parsed.append((t, prefix, t.rstrip("*") if prefix else t))

    def covers(j: int, i: int) -> bool:
        _tj, pj, bj = parsed[j]
        _ti, pi, bi = parsed[i]
        return (pj and bi.startswith(bj)) or (not pj and not pi and bi == bj)

    keep = []
    for i, (t, _p, _b) in enumerate(parsed):
        if not any(j != i and covers(j, i) and (j < i or not covers(i, j))
                   for j in range(len(parsed))):
            keep.append(t)
    return tuple(keep)


class Store:
    """Keeps durable copies of the streams matching ``topics`` and serves them.

    Example::

        store = Store(node, topics=("sensors.",))   # follows every sensors.* publisher
        ...
        store.close()

    Subscribers use stores on their own: a replay request for a range the origin cannot
    serve (it is gone, or its retention deleted it) goes to a store holding it, and the
    answer carries the origin's envelopes unchanged (signatures verify as the origin's).

    Fetches are held to a replay byte budget per peer, as the publisher's replays are
    (``fetch_peer_bytes``): a peer that asks and never reads gets ``"busy"`` once that much
    is unproven.

    Args:
        node: the started node (its ``data_dir`` holds the replicas).
        topics: stream names or prefixes (ending in ``.`` or ``*``; ``""``: every stream), as
            for :class:`~patterns.pubsub.subscriber.Subscriber`. They may overlap: a topic
            another one covers (``"a.b."`` beside ``"a."``, a name beside a prefix of it, a
            repeat) is not followed on its own, so every stream has one follower and one
            copy (:func:`followed_topics`; ``Store.topics`` holds the topics followed).
        log_config: the replica logs' settings (retention is the store's own).
        tamper: tests only: a function applied to every envelope a fetch answer sends (a
            store that alters data, to show that verifying subscribers refuse it).
        fetch_peer_bytes: the fetch byte budget of one peer (see above).
        sync: when a copy is acked to its origin. ``"fsync"`` (the default): once fsynced,
            so an acked event survives a power cut of the store's machine. ``"write"``
            (opt-in): once written to the operating system (the replica log's own fsync
            policy runs as configured, every 10 ms by default), so an acked event survives
            the store process's crash but not a power cut or a crash of the store's OS, as
            NATS JetStream's default acks (docs/architecture.md, "Replicated streams").
            Origins cannot tell the two apart: choose it for every store of a stream.

    Raises:
        ConfigError: no topic, a topic that is not a str, or a store already runs on this
            node.
        LogError: a replica cannot be opened.
    """

    def __init__(self, node: Any, topics: Iterable[str] = ("",), *,
                 log_config: LogConfig | None = None,
                 tamper: Callable[[bytes], bytes] | None = None,
                 fetch_peer_bytes: int = FETCH_PEER_BYTES,
                 sync: str = "fsync") -> None:
        if sync not in SYNC_MODES:
            raise ConfigError(f"store sync must be one of {', '.join(SYNC_MODES)}, "
                              f"got {sync!r}")
        tops = list(topics)
        if not tops:
            raise ConfigError("a store needs at least one topic")
        for top in tops:
            if not isinstance(top, str):
                raise ConfigError(f"a store topic is a str, not {type(top).__name__}")
        self.node = node
        self.topics = followed_topics(tops)
        self._config = log_config or LogConfig()
        self._tamper = tamper
        self.sync = sync
        self._fsync_acks = sync == "fsync"
        self._root = Path(node.data_dir) / "replicas"
        self._lock = threading.Lock()  # the replicas dict
        self._replicas: dict[Key, _Replica] = {}
        self._dirty: set[Key] = set()
        #: (origin, stream) -> (origin epoch, head) last made durable (fsynced) and acked
        self._durable: dict[Key, tuple[int, int]] = {}
        self._floor_at: dict[Key, float] = {}  # when its position ack was last sent
        self._stats = StoreStats()
        self._logs = LogLimiter(_log)
        self._closed = False
        # Reactor thread only: fetch bytes sent per peer and not proven read (tok -> bytes).
        self._budget = Budget("store_fetch_bytes", fetch_peer_bytes,
                              max(fetch_peer_bytes, FETCH_NODE_BYTES))
        self._sent: dict[str, OrderedDict[int, int]] = {}
        #: Reactor thread only: peer -> (start of its second, holdings requests in it,
        #: copies looked at for them).
        self._hpages: dict[str, tuple[float, int, int]] = {}
        self._order: list[tuple[str, str]] | None = None  # keys in holdings order
        #: (origin, stream) -> first seq found damaged at a read: copied again (_repair)
        self._repairs: dict[Key, int] = {}
        #: (origin, stream) -> a damaged seq no source could give yet (counted once)
        self._unrepaired: dict[Key, int] = {}
        if _registry.get_or_create(node, "pubsub.store", lambda: self) is not self:
            raise ConfigError("a store already runs on this node")
        try:
            self._open_existing()
        except BaseException:
            _registry.drop(node, "pubsub.store", self)
            self._close_replicas()
            raise
        node.handle(frames.CTRL_FETCH, self._on_fetch)
        node.handle(frames.CTRL_HOLDINGS_REQ, self._on_holdings_req)
        self._unpeer = node.on_peer(self._on_peer)
        self._followers = [_Follower(node, t, self) for t in self.topics]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(f,), daemon=True,
                                          name=f"mesh-store-{i}")
                         for i, f in enumerate(self._followers)]
        self._unmetrics: Callable[[], None] = lambda: None
        # Registered before the threads start: an exception below (a KeyboardInterrupt lands
        # wherever the main thread is) still has node.close() stop them first.
        self._unclose = close_with(node, self.close)
        for t in self._threads:
            t.start()
        node.offer("service", frames.STORE_SERVICE)
        self._unmetrics = attach(node, store_collector(self))

    # -- replicas ---------------------------------------------------------------------------

    def _open_existing(self) -> None:
        if not self._root.is_dir():
            return
        for d in sorted(self._root.iterdir()):
            origin = d.name
            if len(origin) != 32 or origin.strip("0123456789abcdef"):
                continue
            for stream in LogDirectory(d).streams():
                key = (origin, stream)
                try:
                    rep = _Replica(self._root, origin, stream, self._config)
                except ReplicaMapDamaged as exc:
                    # The copy's seqs are unknown: keep its files for the operator, copy
                    # the stream again (from the origin or another store).
                    where = self._put_aside(key, "map-damaged")
                    self._stats.damaged += 1
                    self._logs.warning(f"damaged:{key}", "store: %s; moved to %s, copying "
                                       "%s again", exc, where, key)
                    continue
                self._replicas[key] = rep
                bad = rep.first_damaged()
                if bad is not None and rep.head is not None:
                    # Records from ``bad`` on fail their checks: copy them again; what is
                    # readable after the damage is kept in an archive meanwhile.
                    self._stats.damaged += 1
                    self._logs.warning(f"damaged:{key}", "store: %s has damaged records "
                                       "from seq %d: copying them again", key, bad)
                    self._rewind(key, bad)

    def _put_aside(self, key: Key, why: str) -> str:
        """Move a copy's directory to ``replicas/aside/`` (never deleted); returns where."""
        src = LogDirectory(self._root / key[0]).path_for(key[1])
        aside = self._root / ASIDE_DIR
        aside.mkdir(parents=True, exist_ok=True)
        dest = aside / f"{key[0]}-{key[1]}.{why}.{secrets.token_hex(4)}"
        os.replace(src, dest)
        return str(dest)

    def _replica(self, key: Key, *, create: bool) -> _Replica | None:
        with self._lock:
            rep = self._replicas.get(key)
            if rep is None and create and not self._closed:
                rep = self._replicas[key] = _Replica(self._root, key[0], key[1], self._config)
            return rep

    def _append(self, key: Key, first: int, envs: list[bytes], epoch: int) -> bool:
        """Follower thread: write to the copy; False when it failed (nothing acked; the
        follower asks for them again from the copy's head)."""
        try:
            rep = self._replica(key, create=True)
            if rep is None:
                return True  # closing
            rep.append(first, envs, epoch)
        except LogError as exc:
            self._stats.write_errors += 1
            self._logs.warning(f"append:{key}", "store: cannot write %s: %s", key, exc)
            return False
        self._stats.appended += len(envs)
        with self._lock:
            self._dirty.add(key)
        return True

    def _rewind(self, key: Key, to: int) -> None:
        rep = self._replica(key, create=False)
        if rep is not None:
            head = rep.head
            if head is not None and to < head:
                # What the origin's new epoch takes back was the origin's data (acked,
                # maybe, and then the only copy of a lost device's history): keep it, as an
                # archive, before the copy follows the new epoch.
                try:
                    where = self._archive(rep, to, head)
                    self._logs.warning(f"archive:{key}", "store: %s's new epoch takes back "
                                       "seqs %d..%d: kept in %s", key, to, head - 1, where)
                except (LogError, OSError) as exc:
                    self._stats.write_errors += 1
                    self._logs.warning(f"archive:{key}", "store: cannot archive seqs %d..%d "
                                       "of %s: %s", to, head - 1, key, exc)
            rep.rewind(to)
            self._durable.pop(key, None)  # never ack again what the rewind took back
            self._stats.rewinds += 1

    def _archive(self, rep: _Replica, start: int, end: int) -> str:
        """Copy seqs ``start..end-1`` of ``rep`` (under the epochs they were written in) to
        a new archive replica; returns its directory."""
        hist = rep.history().entries
        epoch = next((e for e, s in reversed(hist) if s <= start), rep.epoch)
        name = f"{epoch:08x}-{start}-{secrets.token_hex(4)}"
        arch = _Replica(self._root / ARCHIVE_DIR / name, rep.origin, rep.stream, self._config)
        try:
            seq = start
            while seq < end:
                local, nxt = rep.locate(seq)
                if local is None:
                    if nxt is None or nxt >= end:
                        break
                    seq = nxt
                    continue
                try:
                    first, envs = rep.read(seq, min(MAX_FETCH_RECORDS, end - seq))
                except LogCorruptedRange as exc:  # not archived: it is copied again
                    if exc.next_offset is None or exc.next_offset <= seq:
                        break
                    seq = exc.next_offset
                    continue
                envs = envs[:end - first]
                # Cut at the next epoch's first seq: each record under its own epoch.
                i = 0
                while i < len(envs):
                    s0 = first + i
                    ep = next((e for e, s in reversed(hist) if s <= s0), epoch)
                    stop = next((s for _e, s in hist if s > s0), None)
                    j = len(envs) if stop is None else min(len(envs), stop - first)
                    arch.append(s0, envs[i:j], ep)
                    i = j
                seq = first + len(envs)
            arch.sync()
        finally:
            arch.close()
        self._stats.archived += max(0, end - start)
        return str(arch.path)

    def archives(self) -> list[tuple[str, str, int, int, int, str]]:
        """The ranges origins' new epochs took back from this store's copies, kept aside:
        ``(origin, stream, epoch, first seq, end seq, directory)`` each (the envelopes are
        the origin's, byte for byte; :meth:`read_archive` reads them). They are kept until
        an operator removes the directory."""
        out: list[tuple[str, str, int, int, int, str]] = []
        root = self._root / ARCHIVE_DIR
        if not root.is_dir():
            return out
        for d in sorted(root.iterdir()):
            for od in sorted(d.iterdir()) if d.is_dir() else []:
                for stream in LogDirectory(od).streams():
                    rep = _Replica(d, od.name, stream, LogConfig())
                    try:
                        if rep.head is not None:
                            out.append((od.name, stream, int(d.name.split("-")[0], 16),
                                        rep.oldest or 0, rep.head, str(rep.path)))
                    finally:
                        rep.close()
        return out

    def read_archive(self, directory: str) -> list[tuple[int, bytes]]:
        """Every ``(seq, envelope)`` of one archive (a directory :meth:`archives` listed).

        Raises:
            LogError: it cannot be read.
        """
        path = Path(directory)
        rep = _Replica(path.parent.parent.parent, path.parent.parent.name, path.name,
                       LogConfig())
        try:
            out: list[tuple[int, bytes]] = []
            seq, head = rep.oldest or 0, rep.head or 0
            while seq < head:
                local, nxt = rep.locate(seq)
                if local is None:
                    if nxt is None:
                        break
                    seq = nxt
                    continue
                first, envs = rep.read(seq, MAX_FETCH_RECORDS)
                out.extend((first + i, e) for i, e in enumerate(envs))
                seq = first + len(envs)
            return out
        finally:
            rep.close()

    def _run(self, follower: _Follower) -> None:
        next_reack = time.monotonic() + REACK_S
        while not self._stop.is_set():
            try:
                follower._pump_slice(50)
            except ClosedError:
                return
            except MeshError as exc:
                self._logs.warning("pump", "store: follower failed: %s", exc)
            if self._repairs:
                self._repair(follower)
            self._sync_and_ack(reack=(now := time.monotonic()) >= next_reack)
            if now >= next_reack:
                next_reack = now + REACK_S

    def _note_damage(self, key: Key, seq: int) -> None:
        """Any thread: records of ``key`` from ``seq`` on failed their checks when read."""
        with self._lock:
            if key in self._replicas:
                self._repairs[key] = min(seq, self._repairs.get(key, seq))

    def _repair(self, follower: _Follower) -> None:
        """Follower thread: copy again what was found damaged, from the origin while it
        is live or from another live store that holds it (what is readable after the damage
        is archived first). With neither, the copy stays as it is: its answers skip the
        damaged records (``skip "damaged"``) and serve the rest."""
        with self._lock:
            todo = [(k, s) for k, s in self._repairs.items() if follower._matches(k[1])]
            for k, _s in todo:
                del self._repairs[k]
        live = {p.node_id for p in self.node.who_offers("stream", prefix="")}
        board = board_for(self.node)
        stores = set(board.stores()) - {self.node.id}
        for key, seq in todo:
            rep = self._replica(key, create=False)
            if rep is None or rep.head is None or seq >= rep.head:
                continue
            other = [s for s, (lo, hi, _e) in board.holders(key, stores).items()
                     if lo <= seq < hi and self.node.permits(s, "replicate", key[1])]
            if key[0] not in live and not other:
                # Served with a skip; the next read that finds it tries again.
                if self._unrepaired.get(key) != seq:
                    self._unrepaired[key] = seq
                    self._stats.damaged += 1
                self._logs.warning(f"damaged:{key}", "store: %s has damaged records from seq "
                                   "%d, and neither its origin nor another store that holds "
                                   "them is live: served with a skip", key, seq)
                continue
            if self._unrepaired.pop(key, None) != seq:
                self._stats.damaged += 1  # (counted already when no source had it)
            self._logs.warning(f"damaged:{key}", "store: %s has damaged records from seq %d: "
                               "copying them again from %s", key, seq,
                               "the origin" if key[0] in live else f"store {other[0]}")
            self._rewind(key, seq)
            entry = follower._trackers.get(key)
            if entry is not None:
                tracker = entry[1]
                tracker.expected = seq  # asked for again, as after a failed write
                tracker._buffer.clear()
                # An answer to a request made before (from the old position) would read as
                # a skip at the source: it is stale now (its req is no longer awaited).
                tracker._outstanding = None
                follower._positions[key] = seq

    def _sync_and_ack(self, *, reack: bool) -> None:
        """fsync every replica written since the last call, then ack it to its origin (all
        of them when ``reack``): an ack is never sent for a record not on disk (with
        ``sync="write"``: not written).

        The acks leave from this thread right after the round's fsyncs (``Node.send_now``: no
        hand-off to the reactor), one multipart per origin (a reack of thousands of copies
        is cut and batched as any send). The position ack (the origin's retention floor)
        rides along at most every :data:`FLOOR_ACK_S` per copy and at every reack, ahead of
        the replication acks: a floor that lags keeps more, never less, and the origin has
        less to do between reading an ack and waking a waiting publisher.
        """
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            keys = list(self._replicas) if reack else list(dirty)
        floors: dict[str, list[tuple[str, object]]] = {}
        acks: dict[str, list[tuple[str, object]]] = {}
        now = time.monotonic()
        for key in keys:
            rep = self._replica(key, create=False)
            if rep is None:
                continue
            with rep.lock:  # what is acked is read before the fsync that covers it
                head, epoch = rep.head, rep.epoch
            if head is None:
                continue
            if key in dirty or key not in self._durable:
                try:
                    if self._fsync_acks:
                        rep.sync()
                except LogError as exc:
                    self._logs.warning(f"sync:{key}", "store: fsync of %s failed: %s", key,
                                       exc)
                    with self._lock:
                        self._dirty.add(key)  # tried again at the next round
                    continue
                self._durable[key] = (epoch, head)
            else:
                epoch, head = self._durable[key]
            if reack or now - self._floor_at.get(key, 0.0) >= FLOOR_ACK_S:
                # Also as a durable subscription's position: the origin's retention keeps
                # what this store has not copied yet (within its floor TTL and byte cap).
                floors.setdefault(key[0], []).append(
                    (frames.CTRL_ACK, frames.Ack(ACK_NAME, key[1], head).to_body()))
                self._floor_at[key] = now
            acks.setdefault(key[0], []).append(
                (frames.CTRL_REPLICATED, frames.Replicated(key[1], epoch, head).to_body()))
        for origin, msgs in acks.items():
            try:
                self.node.send_now(origin, floors.get(origin, []) + msgs)
                self._stats.acks += len(msgs)
            except MeshError:
                pass  # the origin is gone: acked again when it is back (REACK_S)

    # -- serving (reactor thread) -----------------------------------------------------------

    def _on_holdings_req(self, peer_id: str, body: object) -> None:
        # Reactor thread. One page per request: up to MAX_HOLDINGS items, at most
        # HOLDINGS_SCAN copies looked at (a peer allowed few streams cannot make every
        # request a walk of all of them), in holdings_order; ``next`` resumes after the
        # last copy looked at. Each peer gets HOLDINGS_PEER_PAGES requests and
        # HOLDINGS_PEER_SCAN copies looked at per second.
        if self._closed:
            return
        try:
            prefix, req, after = frames.decode_holdings_req(body)
        except (ProtocolError, CodecError) as exc:
            self._stats.holdings_refused += 1
            self._logs.warning(f"bad:{peer_id}", "store: bad holdings request from %s: %s",
                               peer_id, exc)
            return
        room = self._holdings_room(peer_id)
        if room <= 0:
            self._stats.holdings_refused += 1
            self._logs.warning(f"hbudget:{peer_id}", "store: %s is over its holdings budget "
                               "(%d requests, %d copies looked at a second): not answered",
                               peer_id, HOLDINGS_PEER_PAGES, HOLDINGS_PEER_SCAN)
            return
        order = self._holdings_sorted()
        i = bisect.bisect_left(order, (prefix, ""))
        if after is not None:  # strictly after the cursor
            i = max(i, bisect.bisect_right(order, frames.holdings_order(*after)))
        items: list[frames.Holding] = []
        last: Key | None = None
        scanned = 0
        more = False
        while i < len(order):
            stream, origin = order[i]
            if not stream.startswith(prefix):
                break  # past the prefix's range
            if len(items) >= frames.MAX_HOLDINGS or scanned >= min(HOLDINGS_SCAN, room):
                more = True
                break
            i += 1
            scanned += 1
            last = (origin, stream)
            rep = self._replica(last, create=False)
            if rep is None or not self.node.permits(peer_id, "replay", stream):
                continue
            head, oldest = rep.head, rep.oldest
            if head is None:
                continue
            items.append(frames.Holding(origin, stream, head if oldest is None else oldest,
                                        head, rep.epoch))
        start, n, used = self._hpages[peer_id]
        self._hpages[peer_id] = (start, n, used + scanned)
        try:
            self.node.send(peer_id, frames.CTRL_HOLDINGS, frames.encode_holdings(
                req, items, more, last if more else None))
            self._stats.holdings_answers += 1
        except MeshError:
            pass

    def _holdings_sorted(self) -> list[tuple[str, str]]:
        """Every copy's key in holdings order (cached; rebuilt when a copy was added)."""
        with self._lock:
            order = self._order
            if order is None or len(order) != len(self._replicas):
                order = self._order = sorted(frames.holdings_order(o, s)
                                             for o, s in self._replicas)
            return order

    def _holdings_room(self, peer_id: str) -> int:
        """Reactor thread: take one of ``peer_id``'s holdings requests of this second;
        returns how many copies it may still have looked at this second (0: refused)."""
        now = time.monotonic()
        start, n, used = self._hpages.get(peer_id, (now, 0, 0))
        if now - start >= 1.0:
            start, n, used = now, 0, 0
        if n >= HOLDINGS_PEER_PAGES or used >= HOLDINGS_PEER_SCAN:
            return 0
        if peer_id not in self._hpages and len(self._hpages) >= 4096:
            self._hpages.clear()  # bounded by the peers of the last second or so
        self._hpages[peer_id] = (start, n + 1, used)
        return HOLDINGS_PEER_SCAN - used

    def _on_fetch(self, peer_id: str, body: object) -> None:
        if self._closed:
            return
        try:
            rq = frames.decode_fetch(body)
        except (ProtocolError, CodecError) as exc:
            self._stats.fetch_refused += 1
            self._logs.warning(f"bad:{peer_id}", "store: bad fetch from %s: %s", peer_id, exc)
            target = frames.replay_reply_target(body)
            if target is not None:
                self._reply(peer_id, frames.ReplayData(
                    target[0], target[1], target[2], 0, [], 0, 0, False,
                    frames.REPLAY_ERROR_MALFORMED))
            return
        assert rq.origin is not None
        budget = self._budget
        sent = self._sent.get(peer_id)
        if sent is not None:
            budget.give_through(peer_id, sent, rq.tok)  # that answer and every one before it were read
        room = budget.room(peer_id)
        if not self.node.permits(peer_id, "replay", rq.stream):
            self._stats.fetch_refused += 1
            reply = frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], 0, 0,
                                      False, "forbidden", origin=rq.origin)
        elif room - FETCH_REPLY_COST < min(FETCH_MIN_CHUNK, budget.per_key // 2) \
                or self.node.backlogged(peer_id):
            self._stats.fetch_refused += 1
            self._stats.fetch_busy += 1
            reply = frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], 0, 0,
                                      False, "busy", retry_ms=FETCH_RETRY_MS,
                                      origin=rq.origin)
        else:
            if rq.max_bytes > room - FETCH_REPLY_COST:
                rq = dataclasses.replace(rq, max_bytes=room - FETCH_REPLY_COST)
            reply = self._serve(rq)
        self._reply(peer_id, reply, budgeted=True)

    def _reply(self, peer_id: str, reply: frames.ReplayData, *, budgeted: bool = False) -> None:
        cost = tok = 0
        if budgeted:
            cost = FETCH_REPLY_COST + sum(map(len, reply.events))
            if not self._budget.take(peer_id, cost):
                self._stats.fetch_refused += 1  # not even the answer fits: none
                return
            tok = secrets.randbits(63)
            self._sent.setdefault(peer_id, OrderedDict())[tok] = cost
            reply = dataclasses.replace(reply, tok=tok)
        try:
            self.node.send(peer_id, frames.CTRL_REPLAY_DATA, reply.to_body())
        except MeshError as exc:
            if budgeted:
                del self._sent[peer_id][tok]
                self._budget.give(peer_id, cost)
            self._logs.log(logging.INFO, f"unsent:{peer_id}", "store: fetch answer to %s not "
                           "sent: %s", peer_id, exc)

    def _on_peer(self, ev: Any) -> None:
        # Reactor thread: a peer that left holds nothing of the fetch budget any more.
        if ev.kind is PeerEventKind.LEFT:
            self._sent.pop(ev.peer.node_id, None)
            self._hpages.pop(ev.peer.node_id, None)
            self._budget.drop(ev.peer.node_id)

    def _serve(self, rq: frames.ReplayRequest) -> frames.ReplayData:
        """Answer a fetch as the origin's publisher would (``_PubHub._serve``), from the
        replica: same fields, the origin's epochs, plus ``origin``."""
        origin = rq.origin
        assert origin is not None
        rep = self._replica((origin, rq.stream), create=False)
        head = rep.head if rep is not None else None
        if rep is None or head is None:
            self._stats.fetch_refused += 1
            return frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], 0, 0,
                                     False, "unknown_stream", origin=origin)
        self._stats.fetches += 1
        oldest = rep.oldest
        oldest = head if oldest is None else oldest
        epoch = rep.epoch
        hist = rep.history()
        if rq.start is not None:
            start = rq.start
        else:
            try:
                local = rep.log.offset_for_time(rq.from_time or 0)
            except LogError as exc:
                return frames.ReplayData(rq.sid, rq.req, rq.stream, 0, [], head, oldest,
                                         False, f"log_error: {exc}", epoch, origin=origin)
            start = self._seq_of_local(rep, local, head)
        truncate = None
        epoch_end = None
        if rq.epoch is not None and rq.epoch != epoch:
            epoch_end = hist.end_of(rq.epoch)
        if rq.start is not None and rq.epoch is not None:
            d = hist.divergence(rq.epoch, min(rq.start, head))
            if rq.start > head:
                d = min(d, head)
            if d < rq.start:
                truncate = start = d
        gone = start < oldest
        if gone:
            start = oldest
        end = head if rq.end is None or truncate is not None else min(rq.end, head)
        n = min(rq.max_records, MAX_FETCH_RECORDS, max(0, end - start))
        events: list[bytes] = []
        first = start
        skip: tuple[int, int, str] | None = None
        if n:
            loc, nxt = rep.locate(start)
            if loc is None:
                # A hole in the copy (the source skipped those seqs): say so, go on after it.
                stop = nxt if nxt is not None else head
                skip = (start, max(stop, start + 1), "missing")
                first = skip[1]
            else:
                try:
                    first, events = rep.read(start, n)
                except LogCorruptedRange as exc:
                    nx = exc.next_offset if exc.next_offset is not None else head
                    skip = (start, max(nx, start + 1), "damaged")
                    first = skip[1]
                    self._note_damage((origin, rq.stream), start)
                except OffsetOutOfRange:
                    gone, first = True, rep.oldest or head
                except LogError as exc:
                    return frames.ReplayData(rq.sid, rq.req, rq.stream, start, [], head,
                                             oldest, gone, f"log_error: {exc}", epoch,
                                             origin=origin)
            first, skip = frames.trim_chunk(events, first, min(rq.max_bytes, MAX_FETCH_BYTES),
                                            rq.max_event, skip)
        if self._tamper is not None:
            events = [self._tamper(e) for e in events]
        self._stats.fetch_events += len(events)
        return frames.ReplayData(rq.sid, rq.req, rq.stream, first, events, head, oldest, gone,
                                 None, epoch, truncate, skip, epoch_end, origin=origin)

    @staticmethod
    def _seq_of_local(rep: _Replica, local: int, head: int) -> int:
        with rep.lock:
            for i, (seq, lo, _count) in enumerate(rep.runs):
                if local < lo:
                    return seq
                if local < lo + (rep._run_end(i) - seq):
                    return seq + local - lo
            return head

    # -- introspection / lifecycle ------------------------------------------------------------

    def holdings(self) -> list[frames.Holding]:
        """What this store holds now: one item per (origin, stream) with any record."""
        with self._lock:
            reps = list(self._replicas.values())
        out = []
        for rep in reps:
            head, oldest = rep.head, rep.oldest
            if head is not None:
                out.append(frames.Holding(rep.origin, rep.stream,
                                          head if oldest is None else oldest, head, rep.epoch))
        return out

    def read(self, origin: str, stream: str, start: int = 0,
             max_records: int = 1000) -> list[tuple[int, bytes]]:
        """``(seq, envelope)`` pairs this store holds of ``origin``'s ``stream`` from
        ``start`` (tools and tests; holes are skipped).

        Raises:
            LogError: a read failed.
        """
        rep = self._replica((origin, stream), create=False)
        out: list[tuple[int, bytes]] = []
        if rep is None:
            return out
        seq = start
        head = rep.head or 0
        while seq < head and len(out) < max_records:
            local, nxt = rep.locate(seq)
            if local is None:
                if nxt is None:
                    break
                seq = nxt
                continue
            try:
                first, envs = rep.read(seq, max_records - len(out))
            except LogCorruptedRange:
                self._note_damage((origin, stream), seq)
                raise
            out.extend((first + i, e) for i, e in enumerate(envs))
            seq = first + len(envs)
        return out

    def missing(self) -> dict[Key, list[tuple[int, int]]]:
        """(origin, stream) -> the seq ranges ``(start, end)`` inside a copy it does not
        hold: truly lost there (its source had deleted or skipped them when the copy was
        made, e.g. after a power cut cut the copy back below what the origin still kept).
        Only copies with a hole are listed."""
        with self._lock:
            reps = list(self._replicas.items())
        return {k: h for k, rep in reps if (h := rep.holes())}

    def lag(self) -> dict[Key, int]:
        """(origin, stream) -> how many seqs the copy is behind the origin's head as the
        store last heard it (DATA, heartbeats, replay answers); 0 when caught up."""
        out: dict[Key, int] = {}
        for f in self._followers:
            for key, (_epoch, tracker) in list(f._trackers.items()):
                rep = self._replica(key, create=False)
                head = (rep.head if rep is not None else None) or 0
                out[key] = max(0, tracker.known_head - head)
        return out

    def durable(self) -> dict[Key, tuple[int, int]]:
        """(origin, stream) -> ``(origin epoch, seq)``: everything below ``seq`` is on this
        store's disk (fsynced; with ``sync="write"``: written); the store acks exactly these
        to the origins."""
        return dict(self._durable)

    def stats(self) -> StoreStats:
        """A snapshot of the store's counters."""
        s = StoreStats(**self._stats.__dict__)
        s.replicas = len(self._replicas)
        return s

    def close(self) -> None:
        """Stop following, fsync and ack what was written, close the replicas. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        for f in self._followers:
            f.close()
        for t in self._threads:
            if t.ident is not None and t is not threading.current_thread():
                t.join(timeout=5.0)
        try:
            self._sync_and_ack(reack=False)
        except MeshError:
            pass
        self._unmetrics()
        self._unclose()
        self._unpeer()
        try:
            self.node.withdraw("service", frames.STORE_SERVICE)
        except MeshError:
            pass
        _registry.drop(self.node, "pubsub.store", self)
        self._close_replicas()

    def _close_replicas(self) -> None:
        with self._lock:
            reps = list(self._replicas.values())
        for rep in reps:
            try:
                rep.close()
            except MeshError:
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
