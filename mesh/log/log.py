"""The durable, segmented, append-only log of one stream.

One process writes a stream (an ``flock`` on ``LOCK`` enforces it); any number of read-only
openers, in this or other processes, read while it writes. Every append is handed to the
operating system with ``write()`` before it returns, whatever the fsync policy, so a ``kill -9``
of the writer loses nothing that was acknowledged; the policy only decides when ``fsync``
makes it survive a power cut. See docs/protocol.md and docs/architecture.md.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, NamedTuple, Protocol

from mesh.errors import (
    ClosedError,
    ConfigError,
    DecryptionFailed,
    LogCorruptedRange,
    LogError,
    LogFull,
    LogLocked,
    OffsetOutOfRange,
    RecordTooLarge,
)
from mesh.log import epochs as _epochs
from mesh.log import format as fmt
from mesh.log.segment import BadRegion, Segment, is_full

log = logging.getLogger("mesh.log")

LOCK_NAME = "LOCK"
#: Marker of a log encrypted at rest: holds the hex key id of the cipher its records use.
CIPHER_NAME = "CIPHER"


class RecordSealer(Protocol):
    """What :attr:`LogConfig.cipher` must provide (``mesh.security.atrest.RecordCipher``)."""

    key_id: bytes

    def seal(self, payload: bytes) -> bytes:
        """Encrypt one payload."""

    def seal_many(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Encrypt a batch."""

    def open(self, sealed: bytes, where: str = "record") -> bytes:
        """Decrypt one payload (raises ``DecryptionFailed``)."""
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class FsyncPolicy:
    """When appended data is forced to stable storage with ``fsync``.

    Build one with :meth:`always`, :meth:`interval`, :meth:`every` or :meth:`never`.
    """

    kind: Literal["always", "interval", "every", "never"]
    value: float = 0.0

    @classmethod
    def always(cls) -> FsyncPolicy:
        """fsync before ``append`` returns; concurrent appenders share one fsync."""
        return cls("always")

    @classmethod
    def interval(cls, ms: float) -> FsyncPolicy:
        """fsync from a background thread every ``ms`` milliseconds when there is new data.

        Raises:
            ConfigError: ``ms`` is not positive.
        """
        if not ms > 0:
            raise ConfigError(f"fsync interval must be > 0 ms, got {ms!r}")
        return cls("interval", float(ms))

    @classmethod
    def every(cls, n_records: int) -> FsyncPolicy:
        """fsync in the appending thread once ``n_records`` are not yet synced.

        Raises:
            ConfigError: ``n_records`` is not a positive integer.
        """
        if not isinstance(n_records, int) or n_records < 1:
            raise ConfigError(f"fsync every N records needs N >= 1, got {n_records!r}")
        return cls("every", float(n_records))

    @classmethod
    def never(cls) -> FsyncPolicy:
        """Never fsync (the OS writes back when it likes); ``flush(sync=True)`` still can."""
        return cls("never")


@dataclass(frozen=True)
class Retention:
    """Which old segments :meth:`Log.enforce_retention` deletes (None: no limit).

    Whole segments only, oldest first, never the active one. ``max_age_s`` applies to a
    segment's newest record; ``max_bytes`` and ``max_records`` delete the oldest segments
    while the log is over the limit.
    """

    max_age_s: float | None = None
    max_bytes: int | None = None
    max_records: int | None = None


@dataclass(frozen=True)
class LogConfig:
    """Settings of one log.

    Attributes:
        fsync: the :class:`FsyncPolicy` (default every 10 ms).
        segment_bytes: a new segment starts once the active one would grow past this.
        index_interval_bytes: at most this many bytes between sparse index entries.
        retention: what old data is deleted, see :class:`Retention`.
        corruption: what a read does at a damaged record in the middle of the log:
            ``"raise"`` (default) raises :class:`~mesh.errors.LogCorruptedRange` (earlier
            records of the same call are returned first; ``next_offset`` says where good
            data resumes); ``"skip"`` skips it, counts it in stats and logs a warning.
        keep_past_floors: retention never deletes a segment holding a record at or after a
            floor set with :meth:`Log.set_retention_floor`.
        max_record_bytes: the largest payload ``append`` accepts.
        cipher: optional encryption at rest (a ``RecordCipher``): each payload is sealed at
            append and opened at read; framing, checksums and index stay over the sealed
            bytes, so recovery, retention and seeking work unchanged. The log directory then
            holds a ``CIPHER`` marker with the key id, and opening it without the cipher, or
            with another key, raises ``DecryptionFailed`` before anything is read or written.
    """

    fsync: FsyncPolicy = field(default_factory=lambda: FsyncPolicy.interval(10.0))
    segment_bytes: int = 64 << 20
    index_interval_bytes: int = 4096
    retention: Retention = field(default_factory=Retention)
    corruption: Literal["raise", "skip"] = "raise"
    keep_past_floors: bool = True
    max_record_bytes: int = 16 << 20
    cipher: RecordSealer | None = None

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ConfigError(f"segment_bytes must be >= 4096, got {self.segment_bytes}")
        if self.index_interval_bytes < 1:
            raise ConfigError("index_interval_bytes must be >= 1")
        if self.corruption not in ("raise", "skip"):
            raise ConfigError(f"corruption must be 'raise' or 'skip', got {self.corruption!r}")
        if not 0 < self.max_record_bytes <= fmt.MAX_RECORD_BYTES:
            raise ConfigError(f"max_record_bytes must be in 1..{fmt.MAX_RECORD_BYTES}")


class Record(NamedTuple):
    """One record read back from a log."""

    offset: int
    timestamp_ns: int
    payload: bytes


@dataclass(frozen=True)
class LogStats:
    """A snapshot of a log's counters (see :meth:`Log.stats`)."""

    records: int
    bytes: int
    segments: int
    first_offset: int | None
    last_offset: int | None
    next_offset: int
    oldest_timestamp_ns: int | None
    newest_timestamp_ns: int | None
    durable_offset: int | None
    fsyncs: int
    fsync_latency_last_s: float
    fsync_latency_avg_s: float
    fsync_latency_max_s: float
    truncated_bytes_on_recovery: int
    corrupt_regions: int
    corrupt_records: int
    missing_records: int
    readonly: bool


class _Bad(Exception):
    def __init__(self, position: int, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason
        self.offset = offset  # the offset the reader was looking for


@dataclass
class _Gap:
    start: int  # first missing offset
    end: int  # first offset present again (base of the next segment)
    path: str  # the segment after the gap


class Log:
    """A durable append-only log of one stream. Use :meth:`open`.

    Thread-safe: appends, flushes and reads may come from several threads. Reads use their
    own descriptors and never look past the last fully written batch.
    """

    def __init__(self, path: str, config: LogConfig, readonly: bool) -> None:
        self.path = path
        self.config = config
        self.readonly = readonly
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._followers = 0
        self._segs: list[Segment] = []
        self._active: Segment | None = None
        self._next_offset = 0
        self._durable_next = 0
        self._last_ts = 0
        self._closed = False
        self._lock_fd: int | None = None
        self._floors: dict[str, int] = {}
        self._gaps: list[_Gap] = []
        self._fsyncs = 0
        self._fsync_total = 0.0
        self._fsync_last = 0.0
        self._fsync_max = 0.0
        self._truncated = 0
        self._corrupt_regions = 0
        self._corrupt_records = 0
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.epochs = _epochs.EpochHistory([])

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, config: LogConfig | None = None,
             readonly: bool = False) -> Log:
        """Open (creating it if needed) the log stored in directory ``path``.

        A writer recovers the log first: a torn or damaged tail is cut back to the last good
        record (logged as a warning and counted in :meth:`stats`); damage in the middle of a
        segment and missing segments are recorded and reported, never silently dropped.

        Raises:
            LogLocked: another process holds the writer lock.
            LogCorrupted: the segment files contradict each other (overlapping offsets).
            LogError: the directory cannot be used (missing for ``readonly``, permissions).
        """
        p = os.fspath(path)
        self = cls(p, config or LogConfig(), readonly)
        try:
            if readonly:
                if not os.path.isdir(p):
                    raise LogError(f"no log directory at {p}")
            else:
                os.makedirs(p, exist_ok=True)
                self._take_lock()
            self._load()
            self._check_cipher()
            self._begin_epoch()
        except OSError as exc:
            self._release()
            raise LogError(f"cannot open log {p}: {exc}") from exc
        except BaseException:
            self._release()
            raise
        if not readonly and self.config.fsync.kind == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"log-fsync:{os.path.basename(p)}")
            self._flusher.start()
        return self

    def _begin_epoch(self) -> None:
        # A writer starts a new epoch at its first offset, durably, before any append: a
        # reader can then tell offsets of this incarnation from offsets an earlier one handed
        # out and lost (mesh/log/epochs.py).
        if self.readonly:
            self.epochs = _epochs.EpochHistory(_epochs.load(self.path) or [])
            return
        self.epochs = _epochs.begin(self.path, self._next_offset, self.first_offset is not None,
                                    sync=self.config.fsync.kind != "never")

    @property
    def epoch(self) -> int:
        """The writer epoch of records appended now (0 for a read-only opener with no
        history)."""
        return self.epochs.current

    def _check_cipher(self) -> None:
        # Decide before the first read or write whether this key fits this log: a wrong key
        # must fail loudly here, never look like corruption or damage anything.
        marker = os.path.join(self.path, CIPHER_NAME)
        try:
            with open(marker, encoding="ascii") as f:
                kid: str | None = f.read().strip()
        except FileNotFoundError:
            kid = None
        cipher = self.config.cipher
        if cipher is None:
            if kid is not None:
                raise DecryptionFailed(f"log {self.path}: it is encrypted at rest (key id "
                                       f"{kid}) and was opened without a key")
            return
        mine = cipher.key_id.hex()
        if kid is None:
            if self.first_offset is not None:
                raise DecryptionFailed(f"log {self.path}: it holds plaintext records; an "
                                       "existing log cannot be switched to encryption")
            if self.readonly:
                return
            tmp = marker + ".tmp"
            with open(tmp, "w", encoding="ascii") as f:
                f.write(mine + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
            self._sync_dir()
        elif kid != mine:
            raise DecryptionFailed(f"log {self.path}: it was encrypted under key id {kid}, "
                                   f"this key is {mine}")

    def _take_lock(self) -> None:
        lock_path = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LogLocked(lock_path, f"pid {holder}" if holder else None) from exc
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        for seg in self._segs:
            seg.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _list_bases(self) -> list[int]:
        bases = []
        for name in os.listdir(self.path):
            base = fmt.parse_segment_name(name)
            if base is not None:
                bases.append(base)
            elif name.endswith(".tmp") and not self.readonly:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))  # an interrupted index rewrite
        return sorted(bases)

    def _load(self) -> None:
        for base in self._list_bases():
            seg = Segment(self.path, base, self.config.index_interval_bytes)
            self._recover(seg)
            self._segs.append(seg)
        self._check_gaps()
        if not self._segs:
            if self.readonly:
                return
            seg = Segment(self.path, 0, self.config.index_interval_bytes)
            self._segs.append(seg)
        self._next_offset = self._segs[-1].next_offset
        self._durable_next = self._next_offset
        self._last_ts = max((s.last_ts for s in self._segs if s.last_ts is not None), default=0)
        if not self.readonly:
            self._active = self._segs[-1]
            self._active.open_for_append()
            self._sync_dir()

    def _recover(self, seg: Segment) -> None:
        size = seg.file_size()
        dirty = not seg.load_index()
        if dirty:
            seg.reset_index()
        n_index = len(seg.idx_off)
        while True:
            start_off, start = seg.locate(1 << 63)
            res = seg.scan(start, start_off, size, build_index=True)
            if start > 0 and res.torn_at == start:
                # The last index entry does not point at a good batch: distrust it.
                seg.trim_index(start)
                dirty = True
                continue
            break
        seg.size = res.end
        seg.next_offset = res.next_offset
        seg.last_ts = res.last_ts if res.last_ts is not None else seg.first_ts
        for region in res.bad:
            seg.bad[region.position] = region
            self._report_bad(seg, region)
        if res.torn_at is not None and not self.readonly:
            cut = size - res.end
            log.warning("log %s: truncated a torn or damaged tail of %d bytes at byte %d of %s "
                        "(%s); records before it are intact", self.path, cut, res.end,
                        seg.path, res.torn_reason)
            os.truncate(seg.path, res.end)
            self._truncated += cut
            seg.trim_index(res.end)
            dirty = True
        if (dirty or len(seg.idx_off) != n_index) and not self.readonly:
            seg.save_index()

    def _report_bad(self, seg: Segment, region: BadRegion) -> None:
        self._corrupt_regions += 1
        if region.next_offset is not None:
            self._corrupt_records += max(0, region.next_offset - region.offset)
        log.warning("log %s: damaged records in %s at byte %d (%s): offsets %d..%s unreadable; "
                    "good records after it are kept", self.path, seg.path, region.position,
                    region.reason, region.offset,
                    "?" if region.next_offset is None else region.next_offset - 1)

    def _check_gaps(self) -> None:
        from mesh.errors import LogCorrupted

        gaps = []
        for a, b in zip(self._segs, self._segs[1:], strict=False):
            if a.next_offset < b.base:
                gaps.append(_Gap(a.next_offset, b.base, b.path))
                log.warning("log %s: records %d..%d are missing before %s (a segment was "
                            "deleted or lost?)", self.path, a.next_offset, b.base - 1, b.path)
            elif a.next_offset > b.base:
                raise LogCorrupted(b.path, 0, f"segment starts at offset {b.base} but the "
                                   f"previous one ends at {a.next_offset - 1}")
        self._gaps = gaps

    def _sync_dir(self) -> None:
        if self.config.fsync.kind == "never":
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- properties ---------------------------------------------------------------------

    @property
    def next_offset(self) -> int:
        """The offset the next append will get."""
        return self._next_offset

    @property
    def first_offset(self) -> int | None:
        """The oldest offset held, or None when the log is empty."""
        segs = self._segs
        if not segs or self._next_offset <= segs[0].base:
            return None
        return segs[0].base

    @property
    def last_offset(self) -> int | None:
        """The newest offset held, or None when the log is empty."""
        return None if self.first_offset is None else self._next_offset - 1

    # -- appending ----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedError(f"log {self.path} is closed")
        if self.readonly:
            raise LogError(f"log {self.path} was opened read-only")

    def _now(self) -> int:
        # Default timestamps never go backwards, so the time index stays sorted.
        t = time.time_ns()
        return t if t > self._last_ts else self._last_ts

    def append(self, payload: bytes, timestamp_ns: int | None = None) -> int:
        """Append one record; returns its offset once ``write()`` (and fsync, per policy) ran.

        Raises:
            RecordTooLarge: ``payload`` is over ``config.max_record_bytes``.
            LogFull: the disk or file size limit is full; nothing of the record was kept.
            ClosedError: the log is closed.
            LogError: another I/O error, or the log is read-only.
        """
        if len(payload) > self.config.max_record_bytes:
            raise RecordTooLarge(len(payload), self.config.max_record_bytes)
        if self.config.cipher is not None:
            payload = self.config.cipher.seal(bytes(payload))
        with self._lock:
            self._check_writable()
            ts = self._now() if timestamp_ns is None else timestamp_ns
            off = self._next_offset
            self._write(fmt.encode_one(off, ts, bytes(payload)), off, 1, ts)
            self._next_offset = off + 1
            if ts > self._last_ts:
                self._last_ts = ts
        self._after_append(off)
        return off

    def append_many(self, payloads: Sequence[bytes], timestamp_ns: int | None = None) -> range:
        """Append records as one or more batches (all with one timestamp); returns offsets.

        All records are written or, when the first failure is in the active segment, none.

        Raises:
            RecordTooLarge: a payload is over ``config.max_record_bytes``.
            LogFull: the disk or file size limit is full (records of this call are removed).
            ClosedError: the log is closed.
            LogError: another I/O error, or the log is read-only.
        """
        n = len(payloads)
        lens = list(map(len, payloads))
        biggest = max(lens, default=0)
        if biggest > self.config.max_record_bytes:
            raise RecordTooLarge(biggest, self.config.max_record_bytes)
        if self.config.cipher is not None and n:
            payloads = self.config.cipher.seal_many(payloads)  # outside the lock
            lens = list(map(len, payloads))
        total = sum(lens)
        with self._lock:
            self._check_writable()
            base = self._next_offset
            if n == 0:
                return range(base, base)
            ts = self._now() if timestamp_ns is None else timestamp_ns
            assert self._active is not None
            start_seg, start_size = self._active, self._active.size
            try:
                if total <= fmt.MAX_BATCH_BYTES:
                    self._write(fmt.encode_batch(base, ts, payloads), base, n, ts)
                else:
                    off = base
                    for chunk in _chunks(payloads, lens, fmt.MAX_BATCH_BYTES):
                        self._write(fmt.encode_batch(off, ts, chunk), off, len(chunk), ts)
                        off += len(chunk)
            except BaseException:
                if self._active is start_seg and start_seg.size > start_size:
                    start_seg._undo(start_size)
                    start_seg.size = start_size
                    start_seg.next_offset = base
                    start_seg.trim_index(start_size)
                else:
                    self._next_offset = self._active.next_offset
                raise
            self._next_offset = base + n
            if ts > self._last_ts:
                self._last_ts = ts
        self._after_append(base + n - 1)
        return range(base, base + n)

    def _write(self, data: bytes, off: int, count: int, ts: int) -> None:
        seg = self._active
        assert seg is not None
        if seg.size > 0 and seg.size + len(data) > self.config.segment_bytes:
            seg = self._roll(off)
        try:
            seg.write_batch(data, off, count, ts)
        except OSError as exc:
            if is_full(exc):
                raise LogFull(exc.errno, f"log {self.path} is full ({exc.strerror}); the "
                              f"record at offset {off} was not written") from exc
            raise LogError(f"log {self.path}: write failed: {exc}") from exc

    def _roll(self, base: int) -> Segment:
        old = self._active
        assert old is not None
        sync = self.config.fsync.kind != "never"
        try:
            old.seal(sync=sync)
            if sync:
                self._durable_next = max(self._durable_next, old.next_offset)
            seg = Segment(self.path, base, self.config.index_interval_bytes)
            seg.open_for_append()
            self._sync_dir()
        except OSError as exc:
            if is_full(exc):
                raise LogFull(exc.errno, f"log {self.path} is full ({exc.strerror})") from exc
            raise LogError(f"log {self.path}: cannot start a segment: {exc}") from exc
        self._segs.append(seg)
        self._active = seg
        self._enforce_retention_locked()
        return seg

    def _after_append(self, last: int) -> None:
        kind = self.config.fsync.kind
        if kind == "always" or (
                kind == "every" and self._next_offset - self._durable_next >= self.config.fsync.value):
            self._sync_upto(last)
        if self._followers:
            with self._cond:
                self._cond.notify_all()

    # -- durability ---------------------------------------------------------------------

    def _sync_upto(self, offset: int) -> None:
        # Group commit: whoever holds _sync_lock fsyncs everything written so far, so the
        # appenders queued behind it usually find their offset already durable.
        with self._sync_lock:
            if self._durable_next > offset:
                return
            with self._lock:
                if self._closed or self._active is None or self._active.wfd is None:
                    return
                fd = os.dup(self._active.wfd)
                target = self._next_offset
            t0 = time.perf_counter()
            try:
                os.fsync(fd)
            except OSError as exc:
                raise LogError(f"log {self.path}: fsync failed: {exc}") from exc
            finally:
                os.close(fd)
            dt = time.perf_counter() - t0
            self._fsyncs += 1
            self._fsync_total += dt
            self._fsync_last = dt
            self._fsync_max = max(self._fsync_max, dt)
            self._durable_next = max(self._durable_next, target)

    def _flush_loop(self) -> None:
        interval = self.config.fsync.value / 1000.0
        while not self._stop.wait(interval):
            if self._next_offset > self._durable_next:
                try:
                    self._sync_upto(self._next_offset - 1)
                except Exception:  # keep flushing; the error is also visible to wait_durable
                    log.exception("log %s: background fsync failed", self.path)

    def flush(self, sync: bool = True) -> None:
        """Make everything appended so far durable (``sync``); data is always already written.

        Raises:
            LogError: fsync failed.
        """
        if sync and not self.readonly and self._next_offset > self._durable_next:
            self._sync_upto(self._next_offset - 1)

    def wait_durable(self, offset: int, timeout: float | None = None) -> None:
        """Return once ``offset`` is fsynced (forcing a shared fsync if it is not yet).

        ``timeout`` is accepted for API symmetry; the fsync is forced rather than waited for,
        so the call takes one fsync at most.

        Raises:
            LogError: fsync failed.
        """
        if offset < self._durable_next:
            return
        self._sync_upto(offset)

    # -- reading ------------------------------------------------------------------------

    def read(self, offset: int, max_records: int = 1000) -> list[Record]:
        """Read up to ``max_records`` records starting at ``offset`` (empty at the end).

        Raises:
            OffsetOutOfRange: ``offset`` is below the first offset held (or negative).
            LogCorruptedRange: under ``corruption="raise"``, the first record asked for is
                damaged or missing; records before the damage are returned by the earlier call.
            ClosedError: the log is closed.
        """
        first, payloads, stamps, offs = self._collect(offset, max_records, True)
        if self.config.cipher is not None:
            payloads = self._open_all(first, payloads)
        if offs is None:
            return [Record(first + i, t, p) for i, (t, p) in
                    enumerate(zip(stamps, payloads, strict=True))]
        return [Record(o, t, p) for o, t, p in zip(offs, stamps, payloads, strict=True)]

    def read_batch_payloads(self, offset: int, max_records: int = 1000) -> tuple[int, list[bytes]]:
        """Fast replay: the offset of the first payload returned, and the payloads in order.

        Under ``corruption="skip"`` a damaged range may be skipped, so the payloads are then
        not contiguous; use :meth:`read` when that matters.

        Raises:
            OffsetOutOfRange: see :meth:`read`.
            LogCorruptedRange: see :meth:`read`.
        """
        first, payloads, _, _ = self._collect(offset, max_records, False)
        if self.config.cipher is not None:
            payloads = self._open_all(first, payloads)
        return first, payloads

    def _open_all(self, first: int, payloads: list[bytes]) -> list[bytes]:
        cipher = self.config.cipher
        assert cipher is not None
        opn = cipher.open
        where = f"log {self.path} record near offset {first}"
        return [opn(p, where) for p in payloads]

    def _snapshot(self, offset: int) -> list[Segment]:
        if self._closed:
            raise ClosedError(f"log {self.path} is closed")
        if self.readonly and offset >= self._next_offset:
            with self._lock:
                self._refresh()
        segs = self._segs
        first = self.first_offset
        if offset < 0 or (first is not None and offset < first) or (
                first is None and offset < self._next_offset):
            raise OffsetOutOfRange(offset, first, self.last_offset)
        return segs

    def _collect(self, offset: int, max_records: int, want_ts: bool
                 ) -> tuple[int, list[bytes], list[int], list[int] | None]:
        segs = self._snapshot(offset)
        out: list[bytes] = []
        stamps: list[int] = []
        offs: list[int] | None = None  # only built once a skip makes offsets non-contiguous
        cur = offset
        first = offset
        limit = self._next_offset
        i = bisect.bisect_right([s.base for s in segs], cur) - 1
        while len(out) < max_records and cur < limit and 0 <= i < len(segs):
            seg = segs[i]
            if cur < seg.base:  # offsets missing before this segment (one was deleted)
                region = BadRegion(0, 0, cur, seg.base, "records missing (segment deleted?)")
                before = len(out)
                cur = self._damaged(seg, region, out)
                if cur < 0:
                    break
                if offs is None and before:
                    offs = list(range(first, first + before))
                if not before:
                    first = cur
                continue
            if cur >= seg.next_offset:
                i += 1
                continue
            try:
                cur = self._read_segment(seg, cur, max_records, out, stamps, offs, want_ts)
            except _Bad as bad:
                region = seg.bad.get(bad.position) or self._resolve(seg, bad, bad.offset, segs, i)
                before = len(out)
                newcur = self._damaged(seg, region, out)
                if newcur < 0:
                    break
                if offs is None and before:
                    offs = list(range(first, first + before))
                if not before:
                    first = newcur
                cur = newcur
                if region.next_position >= seg.size:
                    i += 1
                continue
            if cur < seg.next_offset:
                break  # max_records reached
            i += 1
        return first, out, stamps, offs

    def _damaged(self, seg: Segment, region: BadRegion, out: list[bytes]) -> int:
        """Apply the corruption policy; returns where to continue, or -1 to stop here."""
        if self.config.corruption == "raise":
            if out:
                return -1
            raise LogCorruptedRange(seg.path, region.position, region.reason,
                                    offset=region.offset, next_offset=region.next_offset)
        if region.next_offset is None:
            return -1
        return region.next_offset

    def _resolve(self, seg: Segment, bad: _Bad, cur: int, segs: list[Segment],
                 i: int) -> BadRegion:
        end = seg.size
        buf = seg.pread(end - bad.position, bad.position)
        found = fmt.find_next_batch(buf, 1, len(buf), cur)
        if found is not None:
            region = BadRegion(bad.position, bad.position + found[0], cur, found[1].base_offset,
                               bad.reason)
        else:
            nxt = segs[i + 1].base if i + 1 < len(segs) else None
            region = BadRegion(bad.position, end, cur, nxt, bad.reason)
        seg.bad[bad.position] = region
        self._report_bad(seg, region)
        return region

    def _read_segment(self, seg: Segment, cur: int, max_records: int, out: list[bytes],
                      stamps: list[int], offs: list[int] | None, want_ts: bool) -> int:
        end = seg.size
        _, pos = seg.locate(cur)
        for region in seg.bad.values():
            if region.next_offset is None or cur < region.next_offset:
                if region.offset <= cur:
                    raise _Bad(region.position, region.reason, cur)
            elif region.position >= pos:
                pos = max(pos, region.next_position)  # a skip resumes after known damage
        while pos < end and len(out) < max_records:
            buf = seg.pread(min(end - pos, _READ_CHUNK), pos)
            p = 0
            n = len(buf)
            while p < n:
                try:
                    hdr = fmt.check_batch(buf, p, n)
                except fmt.FrameError as exc:
                    if exc.incomplete and p > 0:
                        break  # read the rest with the next chunk
                    if exc.incomplete and n >= 4:
                        need = int.from_bytes(buf[p : p + 4], "little")
                        if n < need <= end - pos and need <= fmt.MAX_FRAME_BYTES * 2:
                            buf = seg.pread(need, pos)
                            n = len(buf)
                            continue
                    raise _Bad(pos + p, exc.reason, cur) from None
                if hdr.base_offset > cur:
                    raise _Bad(pos + p, f"batch offset {hdr.base_offset} where {cur} expected", cur)
                if hdr.next_offset <= cur:
                    p += hdr.length
                    continue
                want = max_records - len(out)
                pl = fmt.batch_payloads(buf, p, hdr, cur - hdr.base_offset, want)
                out.extend(pl)
                if want_ts:
                    stamps.extend([hdr.timestamp_ns] * len(pl))
                if offs is not None:
                    offs.extend(range(cur, cur + len(pl)))
                cur += len(pl)
                p += hdr.length
                if len(out) >= max_records:
                    break
            pos += p
            if len(out) >= max_records:
                break
        return cur

    def iter(self, from_offset: int = 0) -> Iterator[Record]:
        """Iterate over the records from ``from_offset`` (clamped to the first) to the end.

        Raises:
            LogCorruptedRange: see :meth:`read`.
        """
        off = from_offset
        while True:
            first = self.first_offset
            if first is not None and off < first:
                off = first
            recs = self.read(off, 1000)
            if not recs:
                return
            yield from recs
            off = recs[-1].offset + 1

    def follow(self, from_offset: int = 0, stop: threading.Event | None = None,
               poll_s: float = 0.05) -> Iterator[Record]:
        """Like :meth:`iter`, then wait for new records until ``stop`` is set or the log closes.

        In the writing process a new append wakes the follower at once; a read-only opener
        polls every ``poll_s`` seconds.
        """
        off = from_offset
        while not (stop is not None and stop.is_set()) and not self._closed:
            first = self.first_offset
            if first is not None and off < first:
                off = first
            recs = self.read(off, 1000)
            if recs:
                yield from recs
                off = recs[-1].offset + 1
                continue
            if self.readonly:
                if stop is not None:
                    stop.wait(poll_s)
                else:
                    time.sleep(poll_s)  # a poll interval for a read-only tailer
                continue
            with self._cond:
                self._followers += 1
                try:
                    if self._next_offset <= off:
                        self._cond.wait(poll_s)
                finally:
                    self._followers -= 1

    def offset_for_time(self, ts_ns: int) -> int:
        """The first offset whose timestamp is >= ``ts_ns`` (``next_offset`` when none is).

        Assumes timestamps are non-decreasing (true for default timestamps).
        """
        if self.readonly:
            with self._lock:
                self._refresh()
        for seg in list(self._segs):
            if seg.last_ts is None or seg.last_ts < ts_ns or seg.size == 0:
                continue
            pos = seg.locate_time(ts_ns)
            buf = seg.pread(seg.size - pos, pos)
            p = 0
            while p < len(buf):
                try:
                    hdr = fmt.read_header(buf, p)
                except fmt.FrameError:
                    break
                if hdr.timestamp_ns >= ts_ns:
                    return hdr.base_offset
                p += hdr.length
            return seg.next_offset
        return self._next_offset

    def _refresh(self) -> None:
        """Read-only: pick up what the writer appended, rolled or deleted since last time."""
        bases = self._list_bases()
        known = {s.base: s for s in self._segs}
        keep = [known[b] for b in bases if b in known]
        for s in self._segs:
            if s.base not in bases:
                s.close()
        if keep:
            last = keep[-1]
            try:
                size = last.file_size()
            except OSError:
                size = last.size
            if size > last.size:
                res = last.scan(last.size, last.next_offset, size, build_index=True)
                last.size = res.end
                last.next_offset = res.next_offset
                if res.last_ts is not None:
                    last.last_ts = res.last_ts
        for b in bases:
            if b not in known and (not keep or b > keep[-1].base):
                seg = Segment(self.path, b, self.config.index_interval_bytes)
                try:
                    self._recover(seg)
                except FileNotFoundError:
                    continue
                keep.append(seg)
        self._segs = keep
        self._check_gaps()
        if keep:
            self._next_offset = keep[-1].next_offset

    # -- retention ----------------------------------------------------------------------

    def set_retention_floor(self, name: str, offset: int) -> None:
        """Register a consumer position: retention keeps every record at or after it."""
        with self._lock:
            self._floors[name] = offset

    def clear_retention_floor(self, name: str) -> None:
        """Forget a consumer position registered with :meth:`set_retention_floor`."""
        with self._lock:
            self._floors.pop(name, None)

    def enforce_retention(self) -> int:
        """Delete old segments as ``config.retention`` says; returns how many were deleted.

        Raises:
            LogError: the log is read-only.
            ClosedError: the log is closed.
        """
        with self._lock:
            self._check_writable()
            return self._enforce_retention_locked()

    def _enforce_retention_locked(self) -> int:
        r = self.config.retention
        if r.max_age_s is None and r.max_bytes is None and r.max_records is None:
            return 0
        floor = min(self._floors.values()) if self.config.keep_past_floors and self._floors \
            else None
        now = time.time_ns()
        deleted = 0
        total = sum(s.size for s in self._segs)
        while len(self._segs) > 1:
            seg = self._segs[0]
            drop = (
                (r.max_bytes is not None and total > r.max_bytes)
                or (r.max_records is not None
                    and self._next_offset - seg.base > r.max_records)
                or (r.max_age_s is not None and seg.last_ts is not None
                    and seg.last_ts < now - int(r.max_age_s * 1e9))
            )
            if not drop or (floor is not None and seg.next_offset > floor):
                break
            seg.delete()
            self._segs.pop(0)
            total -= seg.size
            deleted += 1
            log.info("log %s: retention deleted %s (offsets %d..%d)", self.path, seg.path,
                     seg.base, seg.next_offset - 1)
        if deleted:
            first = self._segs[0].base
            self._gaps = [g for g in self._gaps if g.start >= first]
        return deleted

    # -- stats and closing --------------------------------------------------------------

    def stats(self) -> LogStats:
        """A snapshot of the log's sizes, offsets and counters."""
        with self._lock:
            if self.readonly and not self._closed:
                self._refresh()
            segs = list(self._segs)
            first = self.first_offset
            missing = sum(g.end - g.start for g in self._gaps)
            return LogStats(
                records=0 if first is None else self._next_offset - first - missing,
                bytes=sum(s.size for s in segs),
                segments=len(segs),
                first_offset=first,
                last_offset=self.last_offset,
                next_offset=self._next_offset,
                oldest_timestamp_ns=next((s.first_ts for s in segs if s.first_ts is not None),
                                         None),
                newest_timestamp_ns=None if first is None else self._last_ts_of(segs),
                durable_offset=None if first is None or self.readonly
                else self._durable_next - 1 if self._durable_next > first else None,
                fsyncs=self._fsyncs,
                fsync_latency_last_s=self._fsync_last,
                fsync_latency_avg_s=self._fsync_total / self._fsyncs if self._fsyncs else 0.0,
                fsync_latency_max_s=self._fsync_max,
                truncated_bytes_on_recovery=self._truncated,
                corrupt_regions=self._corrupt_regions,
                corrupt_records=self._corrupt_records,
                missing_records=missing,
                readonly=self.readonly,
            )

    @staticmethod
    def _last_ts_of(segs: list[Segment]) -> int | None:
        return max((s.last_ts for s in segs if s.last_ts is not None), default=None)

    def close(self) -> None:
        """fsync what is pending (unless the policy is ``never``) and release everything.

        Idempotent. Raises nothing on a second call.
        """
        with self._lock:
            if self._closed:
                return
            pending = not self.readonly and self._next_offset > self._durable_next
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        if pending and self.config.fsync.kind != "never":
            try:
                self._sync_upto(self._next_offset - 1)
            except LogError as exc:
                log.error("log %s: final fsync failed: %s", self.path, exc)
        with self._lock:
            self._closed = True
            self._release()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"<Log {self.path} {mode} next_offset={self._next_offset}>"


def _chunks(payloads: Sequence[bytes], lens: list[int], limit: int) -> Iterator[Sequence[bytes]]:
    start = 0
    acc = 0
    for i, n in enumerate(lens):
        if acc and acc + n > limit:
            yield payloads[start:i]
            start, acc = i, 0
        acc += n
    if start < len(lens):
        yield payloads[start:]
