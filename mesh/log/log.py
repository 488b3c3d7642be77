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
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
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
from mesh.log.background import SCHEDULER
from mesh.log.segment import BadRegion, Segment, _fd_budget, is_full

log = logging.getLogger("mesh.log")

LOCK_NAME = "LOCK"
#: Marker of a log encrypted at rest: holds the hex key id of the cipher its records use.
CIPHER_NAME = "CIPHER"
#: The log's reach (highest segment base, next offset, lost and cut ranges), see
#: :func:`read_marker`.
MARKER_NAME = "MARKER"
#: The persisted retention floors (consumer positions), see :meth:`Log.set_retention_floor`.
FLOORS_NAME = "FLOORS"

#: The wall clock of default timestamps, age retention and floor ages (nanoseconds since the
#: epoch). A module attribute so that tests can make the clock jump.
_clock = time.time_ns
#: A stamp more than this far ahead of the wall clock is not believed: time lookups pass over
#: it and age retention uses the segment's file time instead.
CLOCK_SKEW_NS = 10 * 60 * 10**9
#: Age retention runs on the background thread every ``max_age_s / 4``, within these bounds.
RETENTION_INTERVAL_S = (1.0, 60.0)
#: A floor moved by less than a segment is rewritten to disk at most this often.
FLOORS_SAVE_S = (1.0, 60.0)
#: At most this many floors per log; past it the least recently set one is dropped.
MAX_FLOORS = 10_000


def read_marker(path: str) -> dict[str, object] | None:
    """The ``MARKER`` of the log in ``path`` (None when absent; raises ValueError if garbled).

    Keys: ``version`` (1), ``max_base`` (highest segment base written), ``next_offset`` (the
    offset the log had durably reached when the marker was written), ``first_offset``,
    ``lost`` (``[start, end, reason]`` of tail ranges found missing at an open) and
    ``holes`` (``[start, end, reason]`` of ranges cut out by ``mesh log repair`` or
    acknowledged by it).
    """
    try:
        with open(os.path.join(path, MARKER_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {MARKER_NAME}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != 1 or \
            not isinstance(data.get("next_offset"), int):
        raise ValueError(f"{MARKER_NAME} is not a version 1 marker")
    return data


def write_json_atomic(path: str, data: object, sync: bool) -> None:
    """Replace ``path`` with ``data`` as JSON (temp file, optional fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


class _WriteFds:
    """Writers whose active segment has an open write descriptor, oldest opened first.

    Past ``cap`` the oldest idle one is closed (it reopens on its next append), so the
    process holds at most ``cap`` segment write descriptors however many logs it writes.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lock = threading.Lock()
        self.open: OrderedDict[Log, None] = OrderedDict()

    def opened(self, lg: Log) -> None:
        with self.lock:
            self.open[lg] = None
            self.open.move_to_end(lg)
            if len(self.open) <= self.cap:
                return
            excess = len(self.open) - self.cap
            victims = [v for v in itertools.islice(self.open, excess + 1) if v is not lg]
        for v in victims:
            # Never wait for another log's lock while holding our own: skip a busy one.
            if v._lock.acquire(blocking=False):
                try:
                    v._close_write_locked()
                finally:
                    v._lock.release()

    def closed(self, lg: Log) -> None:
        with self.lock:
            self.open.pop(lg, None)


#: Segment write descriptors of this process (an eighth of RLIMIT_NOFILE, 16..1024).
WRITE_FDS = _WriteFds(_fd_budget(8, 16, 1024))


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
        """fsync within ``ms`` milliseconds of the first append not yet synced.

        The fsync runs on the process's one log background thread (shared by every log), so
        an idle log costs nothing.

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
    segment's newest record (its stamp, capped by the file's modification time so a bogus
    future stamp cannot pin it) and is also enforced on a timer, every ``max_age_s / 4``
    (1-60 s), sealing a quiet stream's active segment once its first record is that old;
    ``max_bytes`` and ``max_records`` delete the oldest segments while the log is over the
    limit (at each segment roll).
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
            floor set with :meth:`Log.set_retention_floor` (a durable subscriber's acked
            position), within ``floor_ttl_s`` and ``floor_max_bytes``.
        floor_ttl_s: a floor not set again for this long is dropped (an abandoned
            subscription); default 7 days, None: never.
        floor_max_bytes: floors keep at most this many bytes beyond what ``retention``
            alone would keep (the oldest held segments go first, with a warning), so a dead
            subscriber cannot fill the disk; default 1 GiB, None: unbounded.
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
    floor_ttl_s: float | None = 7 * 86400.0
    floor_max_bytes: int | None = 1 << 30

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ConfigError(f"segment_bytes must be >= 4096, got {self.segment_bytes}")
        if self.index_interval_bytes < 1:
            raise ConfigError("index_interval_bytes must be >= 1")
        if self.corruption not in ("raise", "skip"):
            raise ConfigError(f"corruption must be 'raise' or 'skip', got {self.corruption!r}")
        if not 0 < self.max_record_bytes <= fmt.MAX_RECORD_BYTES:
            raise ConfigError(f"max_record_bytes must be in 1..{fmt.MAX_RECORD_BYTES}")
        if self.floor_ttl_s is not None and not self.floor_ttl_s > 0:
            raise ConfigError(f"floor_ttl_s must be > 0 or None, got {self.floor_ttl_s!r}")
        if self.floor_max_bytes is not None and self.floor_max_bytes < 0:
            raise ConfigError(f"floor_max_bytes must be >= 0 or None, got "
                              f"{self.floor_max_bytes!r}")


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
    #: Records the log once durably reached but no longer holds (a deleted or cut-back
    #: last segment found at an open), see :attr:`Log.lost_ranges`.
    lost_tail_records: int = 0
    #: Those ranges as ``(start, end)`` offsets, ``end`` exclusive.
    lost_ranges: tuple[tuple[int, int], ...] = ()


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
        self._closed = False
        self._lock_fd: int | None = None
        self._floors: dict[str, tuple[int, float]] = {}  # name -> (offset, set at: unix s)
        self._floors_dirty = 0  # 1: moved within a segment, 2: added/removed/crossed one
        self._floor_save_armed = False
        self._marker: dict[str, object] = {}
        self._lost: list[tuple[int, int]] = []
        self._interval = config.fsync.kind == "interval"
        self._flush_armed = False
        self._house_armed = False
        self._dir_dirty = False  # files were created in the directory since its last fsync
        self._gaps: list[_Gap] = []
        self._fsyncs = 0
        self._fsync_total = 0.0
        self._fsync_last = 0.0
        self._fsync_max = 0.0
        self._truncated = 0
        self._corrupt_regions = 0
        self._corrupt_records = 0
        self.epochs = _epochs.EpochHistory([])
        self._start_offset = 0
        self._epochs_dirty = False  # EPOCHS written, not yet fsynced (before the data is)

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, config: LogConfig | None = None,
             readonly: bool = False, start_offset: int = 0) -> Log:
        """Open (creating it if needed) the log stored in directory ``path``.

        A writer recovers the log first: a torn or damaged tail is cut back to the last good
        record (logged as a warning and counted in :meth:`stats`); damage in the middle of a
        segment and missing segments are recorded and reported, never silently dropped.

        ``start_offset`` is the first offset of a log that holds no segment yet (a new
        directory): a writer that lost its log continues after seqs others still hold
        (patterns/pubsub/store.py). It is ignored when the log has segments.

        Raises:
            LogLocked: another process holds the writer lock.
            LogCorrupted: the segment files contradict each other (overlapping offsets).
            LogError: the directory cannot be used (missing for ``readonly``, permissions).
        """
        p = os.fspath(path)
        if start_offset < 0:
            raise ConfigError(f"start_offset must be >= 0, got {start_offset}")
        self = cls(p, config or LogConfig(), readonly)
        self._start_offset = start_offset
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
            if not readonly:
                self._load_floors()
        except OSError as exc:
            self._release()
            raise LogError(f"cannot open log {p}: {exc}") from exc
        except BaseException:
            self._release()
            raise
        if not readonly:
            self._arm_housekeeping()
        return self

    def _begin_epoch(self) -> None:
        # A writer starts a new epoch at its first offset, durably, before any append: a
        # reader can then tell offsets of this incarnation from offsets an earlier one handed
        # out and lost (mesh/log/epochs.py).
        if self.readonly:
            self.epochs = _epochs.EpochHistory(_epochs.load(self.path) or [])
            return
        # Written now, fsynced with (just before) the first fsync of this epoch's data, like
        # a new segment's directory entry: opening 10,000 logs costs no fsync each, and no
        # record of the epoch is durable before the epoch is.
        self.epochs = _epochs.begin(self.path, self._next_offset, self.first_offset is not None,
                                    sync=False)
        if self.config.fsync.kind != "never":
            self._epochs_dirty = self._dir_dirty = True

    def _sync_epochs(self) -> None:
        if self._epochs_dirty:
            _epochs.sync(self.path)
            self._epochs_dirty = False

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
        WRITE_FDS.closed(self)
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
        self._check_marker()
        if not self._segs:
            if self.readonly:
                return
            seg = Segment(self.path, self._start_offset, self.config.index_interval_bytes)
            self._segs.append(seg)
        self._next_offset = self._segs[-1].next_offset
        if not self.readonly:
            self._active = self._segs[-1]
            self._active.open_for_append()
            WRITE_FDS.opened(self)
            self._dir_dirty = True  # synced with the first fsync of data, not on this path
            self._durable_next = self._sync_at_open()

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

    def _sync_at_open(self) -> int:
        # What a killed writer left may still be only in the page cache: claim it durable
        # only once it is fsynced here (never under FsyncPolicy.never: nothing is claimed).
        if self.config.fsync.kind == "never":
            return self._segs[0].base
        seg = next((s for s in reversed(self._segs) if s.size > 0), None)
        if seg is not None:
            t0 = time.perf_counter()
            fd = os.open(seg.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_dir()
            self._dir_dirty = False
            self._count_fsync(time.perf_counter() - t0)
        return self._next_offset

    def _check_marker(self) -> None:
        # The marker says how far the log durably got; ending short of it means a deleted
        # or cut-back last segment: counted, warned, kept as a lost range (never silent).
        try:
            m = read_marker(self.path)
        except ValueError as exc:
            log.warning("log %s: %s; ignored (rewritten at the next roll or close)",
                        self.path, exc)
            m = None
        self._marker = dict(m or {})
        lost = self._marker.get("lost")
        if isinstance(lost, list):
            self._lost = [(int(x[0]), int(x[1])) for x in lost
                          if isinstance(x, list) and len(x) >= 2]
        if m is None:
            return
        reach = int(m["next_offset"])  # type: ignore[call-overload]
        have = self._segs[-1].next_offset if self._segs else \
            int(m.get("first_offset") or 0)  # type: ignore[call-overload]
        top = m.get("max_base")
        if reach <= have:
            if isinstance(top, int) and (not self._segs or self._segs[-1].base < top) and \
                    not self.readonly:  # (a reader may race a roll; verify reports it)
                log.warning("log %s: segment %s is missing: records from offset %d on are "
                            "lost (how many is unknown)", self.path, fmt.segment_name(top),
                            top)
            return
        log.warning("log %s: the log once reached offset %d but now ends at %d: records "
                    "%d..%d are lost (last segment deleted or cut back?)", self.path, reach,
                    have, have, reach - 1)
        self._lost.append((have, reach))
        if not self.readonly:
            if not self._segs:  # carry on from where the lost segment began: no reuse here
                self._segs.append(Segment(self.path, have, self.config.index_interval_bytes))
            entries = list(self._marker.get("lost") or [])  # type: ignore[call-overload]
            entries.append([have, reach, "tail lost before this open"])
            self._marker["lost"] = entries
            self._marker["next_offset"] = have
            self._write_marker(have)

    def _write_marker(self, reach: int) -> None:
        """Persist the marker saying the log durably reached ``reach`` (no dir fsync)."""
        m = self._marker
        m["version"] = 1
        m["max_base"] = self._segs[-1].base if self._segs else reach
        m["next_offset"] = reach
        m["first_offset"] = self._segs[0].base if self._segs else reach
        m.setdefault("lost", [])
        m.setdefault("holes", [])
        write_json_atomic(os.path.join(self.path, MARKER_NAME), m,
                          self.config.fsync.kind != "never")

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
        # Real wall time, never clamped to an earlier (possibly bogus, future) stamp: offsets
        # order the log, timestamps only say when; lookups cope with stamps out of order.
        return _clock()

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
        if payload.__class__ is not bytes:
            payload = bytes(payload)
        with self._lock:
            if self._closed or self.readonly:
                self._check_writable()  # raises
            # _now() inline (one Python call less per record; the same module clock).
            ts = _clock() if timestamp_ns is None else timestamp_ns
            off = self._next_offset
            self._write(fmt.encode_one(off, ts, payload), off, 1, ts)
            self._next_offset = off + 1
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
        self._after_append(base + n - 1)
        return range(base, base + n)

    def _write(self, data: bytes, off: int, count: int, ts: int) -> None:
        seg = self._active
        assert seg is not None
        try:
            if seg.size > 0 and seg.size + len(data) > self.config.segment_bytes:
                seg = self._roll(off)
            elif seg.wfd is None:  # closed to bound the process's descriptors
                seg.open_for_append()
                WRITE_FDS.opened(self)
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
            if sync:
                self._sync_epochs()
            old.seal(sync=sync)
            if sync:
                self._durable_next = max(self._durable_next, old.next_offset)
            seg = Segment(self.path, base, self.config.index_interval_bytes)
            seg.open_for_append()
        except OSError as exc:
            if is_full(exc):
                raise LogFull(exc.errno, f"log {self.path} is full ({exc.strerror})") from exc
            raise LogError(f"log {self.path}: cannot start a segment: {exc}") from exc
        self._segs.append(seg)
        self._active = seg
        WRITE_FDS.opened(self)
        try:
            self._write_marker(base)  # the log reached ``base`` (the sealed segment is synced)
        except OSError as exc:  # advisory: a later roll or the close rewrites it
            log.warning("log %s: cannot write %s: %s", self.path, MARKER_NAME, exc)
        try:
            self._sync_dir()
            self._dir_dirty = False
        except OSError as exc:
            raise LogError(f"log {self.path}: cannot sync the directory: {exc}") from exc
        self._enforce_retention_locked()
        return seg

    def _after_append(self, last: int) -> None:
        if self._interval:
            if not self._flush_armed:  # the first unsynced append arms one shared-thread fsync
                self._flush_armed = True
                SCHEDULER.call_later(self.config.fsync.value / 1000.0, self._bg_flush)
        elif (kind := self.config.fsync.kind) == "always" or (
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
                if self._closed or self._active is None:
                    return
                target = self._next_offset
                try:
                    # The write descriptor may be closed (descriptor budget): fsync of any
                    # descriptor of the file flushes its data.
                    wfd = self._active.wfd
                    fd = os.dup(wfd) if wfd is not None else \
                        os.open(self._active.path, os.O_RDONLY)
                except OSError as exc:
                    raise LogError(f"log {self.path}: fsync failed: {exc}") from exc
            t0 = time.perf_counter()
            try:
                self._sync_epochs()
                os.fsync(fd)
                if self._dir_dirty:  # a new segment's name must survive a power cut too
                    self._dir_dirty = False
                    self._sync_dir()
            except OSError as exc:
                self._dir_dirty = True
                raise LogError(f"log {self.path}: fsync failed: {exc}") from exc
            finally:
                os.close(fd)
            self._count_fsync(time.perf_counter() - t0)
            self._durable_next = max(self._durable_next, target)

    def _count_fsync(self, dt: float) -> None:
        self._fsyncs += 1
        self._fsync_total += dt
        self._fsync_last = dt
        self._fsync_max = max(self._fsync_max, dt)

    def _bg_flush(self) -> None:
        # Background thread, armed by the first append not yet synced: one fsync covers
        # everything written until now; the next append after this arms the next one.
        with self._lock:
            self._flush_armed = False
            if self._closed or self._next_offset <= self._durable_next:
                return
        try:
            self._sync_upto(self._next_offset - 1)
        except LogError as exc:  # also visible to wait_durable, which retries the fsync
            log.error("log %s: background fsync failed: %s", self.path, exc)

    def _close_write_locked(self) -> None:
        # Under _lock, from the descriptor budget: the next append reopens it.
        if self._active is not None and self._active.wfd is not None and not self._closed:
            self._active.close_write()
        WRITE_FDS.closed(self)

    # -- background upkeep (age retention, floors) -------------------------------------

    def _house_delay(self) -> float | None:
        r = self.config.retention
        if r.max_age_s is not None:
            lo, hi = RETENTION_INTERVAL_S
            return min(hi, max(lo, r.max_age_s / 4))
        if self._floors or self._floors_dirty:
            return FLOORS_SAVE_S[1]
        return None

    def _arm_housekeeping(self) -> None:
        with self._lock:
            if self._house_armed or self._closed:
                return
            delay = self._house_delay()
            if delay is None:
                return
            self._house_armed = True
        SCHEDULER.call_later(delay, self._housekeep)

    def _housekeep(self) -> float | None:
        with self._lock:
            if self._closed:
                self._house_armed = False
                return None
            try:
                self._age_roll_locked()
                self._enforce_retention_locked()
            except LogError as exc:
                log.warning("log %s: timed retention failed: %s", self.path, exc)
            delay = self._house_delay()
            if delay is None:
                self._house_armed = False
        self._save_floors()
        return delay

    def _age_roll_locked(self) -> None:
        # A quiet stream's old records sit in its active segment, which retention never
        # deletes: once its first record is past max_age, seal it so the next pass can go.
        r = self.config.retention
        seg = self._active
        if r.max_age_s is None or seg is None or seg.size == 0 or len(self._segs) == 0:
            return
        now = _clock()
        first = self._seg_time(seg, seg.first_ts, now, use_mtime=False)
        if first is not None and first < now - int(r.max_age_s * 1e9):
            self._roll(self._next_offset)

    def _seg_time(self, seg: Segment, ts: int | None, now: int, use_mtime: bool = True
                  ) -> int | None:
        """A segment time for age retention that one bogus stamp cannot pin in the future.

        ``ts`` is capped by the file's modification time (when its last record really was
        written); a time still beyond now + skew counts from when it was first seen.
        """
        if ts is None:
            return None
        if use_mtime:
            sealed = seg is not self._active
            m = seg.mtime_cache if sealed and seg.mtime_cache is not None else seg.mtime_ns()
            if sealed:
                seg.mtime_cache = m
            if m is not None and m < ts:
                ts = m
        if ts > now + CLOCK_SKEW_NS:
            if seg.future_seen is None:
                seg.future_seen = now
            ts = seg.future_seen
        return ts

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
                region = BadRegion(0, 0, cur, seg.base, self._gap_reason(cur))
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

    def _gap_reason(self, offset: int) -> str:
        holes = self._marker.get("holes")
        if isinstance(holes, list) and any(
                isinstance(h, list) and len(h) >= 2 and h[0] <= offset < h[1] for h in holes):
            return "records missing (cut out by mesh log repair)"
        return "records missing (segment deleted?)"

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

        Timestamps need not be monotonic (explicit ``timestamp_ns``, wall-clock jumps): a
        stamp more than :data:`CLOCK_SKEW_NS` ahead of the wall clock is passed over, so one
        bogus future record cannot turn a ``--since`` lookup into "from that record on".
        The search is guided by the sparse index, so with stamps out of order it may start
        a little later than the earliest match.
        """
        if self.readonly:
            with self._lock:
                self._refresh()
        limit = _clock() + CLOCK_SKEW_NS
        for seg in list(self._segs):
            if seg.max_ts is None or seg.max_ts < ts_ns or seg.size == 0:
                continue
            pos = seg.locate_time(ts_ns, limit)
            buf = seg.pread(seg.size - pos, pos)
            p = 0
            while p < len(buf):
                try:
                    hdr = fmt.read_header(buf, p)
                except fmt.FrameError:
                    break
                if ts_ns <= hdr.timestamp_ns <= limit:
                    return hdr.base_offset
                p += hdr.length
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
        """Register or move a consumer position: retention keeps every record at or after it.

        Floors are persisted in the log's ``FLOORS`` file (rewritten at most once a second
        when one is added or crosses a segment, at least every minute otherwise, and at
        close), so they hold across restarts. A floor not set again for
        ``config.floor_ttl_s`` is dropped, and together floors keep at most
        ``config.floor_max_bytes`` beyond what retention alone keeps.
        """
        urgent = False
        with self._lock:
            old = self._floors.get(name)
            self._floors[name] = (offset, _clock() / 1e9)
            if old is None and len(self._floors) > MAX_FLOORS:
                stale = min(self._floors, key=lambda k: self._floors[k][1])
                log.warning("log %s: more than %d retention floors: dropped %r", self.path,
                            MAX_FLOORS, stale)
                del self._floors[stale]
            if old is None or self._seg_index(old[0]) != self._seg_index(offset):
                self._floors_dirty = 2
                urgent = not self._floor_save_armed and not self._closed
                if urgent:
                    self._floor_save_armed = True
            elif not self._floors_dirty:
                self._floors_dirty = 1
        if urgent:
            SCHEDULER.call_later(FLOORS_SAVE_S[0], self._save_floors_task)
        if not self._house_armed:
            self._arm_housekeeping()

    def clear_retention_floor(self, name: str) -> None:
        """Forget a consumer position registered with :meth:`set_retention_floor`."""
        with self._lock:
            if self._floors.pop(name, None) is not None:
                self._floors_dirty = 2
        self._save_floors()

    @property
    def retention_floors(self) -> dict[str, int]:
        """The floors in force: name -> offset."""
        with self._lock:
            return {k: v[0] for k, v in self._floors.items()}

    def _seg_index(self, offset: int) -> int:
        return bisect.bisect_right([s.base for s in self._segs], offset)

    def _save_floors_task(self) -> None:
        with self._lock:
            self._floor_save_armed = False
        self._save_floors()

    def _load_floors(self) -> None:
        try:
            with open(os.path.join(self.path, FLOORS_NAME), encoding="utf-8") as f:
                data = json.load(f)
            floors = data["floors"]
            self._floors = {str(k): (int(v[0]), float(v[1])) for k, v in floors.items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("log %s: unreadable %s (%s): floors start empty", self.path,
                        FLOORS_NAME, exc)
            self._floors = {}
        self._expire_floors_locked()

    def _save_floors(self) -> None:
        with self._lock:
            if not self._floors_dirty or self.readonly:
                return
            data = {"version": 1, "floors": {k: [v[0], round(v[1], 3)]
                                             for k, v in self._floors.items()}}
            self._floors_dirty = 0
        try:
            write_json_atomic(os.path.join(self.path, FLOORS_NAME), data,
                              self.config.fsync.kind != "never")
        except OSError as exc:
            log.warning("log %s: cannot save %s: %s", self.path, FLOORS_NAME, exc)
            with self._lock:
                self._floors_dirty = 2

    def _expire_floors_locked(self) -> None:
        ttl = self.config.floor_ttl_s
        if ttl is None or not self._floors:
            return
        cut = _clock() / 1e9 - ttl
        for name in [k for k, v in self._floors.items() if v[1] < cut]:
            log.warning("log %s: retention floor %r was not refreshed for %.0f s: dropped",
                        self.path, name, ttl)
            del self._floors[name]
            self._floors_dirty = 2

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
        self._expire_floors_locked()
        floor = min(v[0] for v in self._floors.values()) \
            if self.config.keep_past_floors and self._floors else None
        now = _clock()
        segs = self._segs
        total = sum(s.size for s in segs)
        k = 0  # retention alone would delete segs[:k]
        while k < len(segs) - 1:
            seg = segs[k]
            age = None if r.max_age_s is None else self._seg_time(seg, seg.max_ts, now)
            drop = (
                (r.max_bytes is not None and total > r.max_bytes)
                or (r.max_records is not None
                    and self._next_offset - seg.base > r.max_records)
                or (age is not None and age < now - int(r.max_age_s * 1e9))  # type: ignore[operator]
            )
            if not drop:
                break
            total -= seg.size
            k += 1
        n = k
        if floor is not None:
            n = next((i for i in range(k) if segs[i].next_offset > floor), k)
            cap = self.config.floor_max_bytes
            held = sum(s.size for s in segs[n:k])
            if cap is not None and held > cap:
                while n < k and held > cap:
                    held -= segs[n].size
                    n += 1
                log.warning("log %s: retention floors held over floor_max_bytes=%d; deleting "
                            "up to offset %d past the lowest floor %d", self.path, cap,
                            segs[n].base - 1, floor)
        for seg in segs[:n]:
            seg.delete()
            log.info("log %s: retention deleted %s (offsets %d..%d)", self.path, seg.path,
                     seg.base, seg.next_offset - 1)
        if n:
            del segs[:n]
            first = segs[0].base
            self._gaps = [g for g in self._gaps if g.start >= first]
        return n

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
                lost_tail_records=sum(b - a for a, b in self._lost),
                lost_ranges=tuple(self._lost),
            )

    @property
    def lost_ranges(self) -> list[tuple[int, int]]:
        """Offset ranges ``(start, end)`` (end exclusive) the log once durably reached and
        then found missing at an open (a deleted or cut-back last segment), oldest first.

        Recorded in the log's ``MARKER`` until ``mesh log repair`` acknowledges them, so a
        publisher can announce them. Offsets from ``start`` on are written again after such
        a loss; the writer epoch tells the two apart. A missing middle segment is not here:
        reads raise :class:`~mesh.errors.LogCorruptedRange` for it.
        """
        return list(self._lost)

    @staticmethod
    def _last_ts_of(segs: list[Segment]) -> int | None:
        return max((s.last_ts for s in segs if s.last_ts is not None), default=None)

    def close(self) -> None:
        """fsync what is pending (unless the policy is ``never``) and release everything.

        A writer also records how far the log got (``MARKER``) and its floors (``FLOORS``).
        Idempotent. Raises nothing on a second call.
        """
        with self._lock:
            if self._closed:
                return
            pending = not self.readonly and self._next_offset > self._durable_next
        synced = not pending
        if pending and self.config.fsync.kind != "never":
            try:
                self._sync_upto(self._next_offset - 1)
                synced = True
            except LogError as exc:
                log.error("log %s: final fsync failed: %s", self.path, exc)
        if not self.readonly:
            self._save_floors()
        with self._lock:
            if not self.readonly and self._segs:
                try:
                    if self._active is not None:
                        self._active.flush_index()
                    reach = self._next_offset if synced or \
                        self.config.fsync.kind == "never" else self._durable_next
                    if reach != self._marker.get("next_offset"):
                        self._write_marker(reach)
                        self._sync_dir()
                    elif self._dir_dirty:
                        self._sync_dir()
                except OSError as exc:
                    log.warning("log %s: cannot write %s at close: %s", self.path,
                                MARKER_NAME, exc)
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
