"""One segment file of a log and its sparse index: scanning, recovery, positioned reads.

A :class:`Segment` knows how many of its bytes are valid (``size``): for the writer that is
what it wrote, for a read-only opener what it has verified. Readers never look past ``size``,
so they never see a record that is only partly written.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import resource
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from mesh.log import format as fmt

log = logging.getLogger("mesh.log")

#: Indirection so the crash tests can interpose on the one write() of a batch (see
#: tests/log_child.py); production code always calls ``os.write``.
_os_write = os.write


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (a short write is retried, never left)."""
    n = _os_write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        n = _os_write(fd, view)
        view = view[n:]


def _fd_budget(share: int, floor: int, ceiling: int) -> int:
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):  # pragma: no cover
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(floor, min(ceiling, soft // share))


class ReadFds:
    """The process-wide, LRU-bounded set of read descriptors of segment files.

    A segment opens its read descriptor on demand (a ``pread`` borrows it) and the least
    recently used idle one is closed once more than ``cap`` are open, so thousands of logs
    with many sealed segments hold a bounded number of descriptors. A descriptor is never
    closed while a read borrows it.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lock = threading.Lock()
        self.open: OrderedDict[Segment, None] = OrderedDict()

    def borrow(self, seg: Segment) -> int:
        """The segment's read descriptor, opened if needed; pair with :meth:`give_back`.

        Raises:
            OSError: the file cannot be opened (e.g. deleted).
        """
        with self.lock:
            fd = seg._rfd
            if fd is None:
                fd = os.open(seg.path, os.O_RDONLY)
                seg._rfd = fd
                self.open[seg] = None
                if len(self.open) > self.cap:
                    self._evict()
            else:
                self.open.move_to_end(seg)
            seg._readers += 1
            return fd

    def give_back(self, seg: Segment) -> None:
        """End a borrow; closes the descriptor if the segment was closed meanwhile."""
        with self.lock:
            seg._readers -= 1
            if seg._readers == 0 and seg._rfd_closing:
                self._close(seg)

    def drop(self, seg: Segment) -> None:
        """Close the segment's read descriptor now, or when its last borrow ends."""
        with self.lock:
            if seg._rfd is None:
                return
            if seg._readers:
                seg._rfd_closing = True
            else:
                self._close(seg)

    def _close(self, seg: Segment) -> None:
        fd, seg._rfd, seg._rfd_closing = seg._rfd, None, False
        self.open.pop(seg, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _evict(self) -> None:
        for victim in list(self.open):
            if len(self.open) <= self.cap:
                return
            if victim._readers == 0:
                self._close(victim)


#: Read descriptors of all segments of all logs in this process (a quarter of the soft
#: RLIMIT_NOFILE / 16, between 16 and 256).
READ_FDS = ReadFds(_fd_budget(16, 16, 256))

#: Index entries buffered in memory before they are appended to the index file; the rest
#: goes out at seal, close and the background flush (the index is rebuilt from the segment
#: on recovery, so a lost tail of it costs a short scan, never data).
INDEX_BUFFER = 64


@dataclass
class BadRegion:
    """A damaged range in the middle of a segment, and where good data resumes."""

    position: int
    next_position: int  # == segment size when nothing valid follows in this segment
    offset: int  # first offset that cannot be read
    next_offset: int | None  # first offset readable after it (None: unknown yet)
    reason: str


@dataclass
class ScanResult:
    """What a scan of a segment range found."""

    end: int  # position after the last good batch
    next_offset: int
    last_ts: int | None
    bad: list[BadRegion] = field(default_factory=list)
    torn_at: int | None = None  # start of an unparseable tail, when one was found
    torn_reason: str = ""


class Segment:
    """A segment file (records from ``base``) plus its in-memory sparse index."""

    __hash__ = object.__hash__

    def __init__(self, directory: str, base: int, index_interval: int) -> None:
        self.base = base
        self.path = os.path.join(directory, fmt.segment_name(base))
        self.index_path = os.path.join(directory, fmt.index_name(base))
        self.index_interval = index_interval
        self.size = 0
        self.next_offset = base
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.max_ts: int | None = None  # largest stamp (stamps need not be monotonic)
        self.mtime_cache: int | None = None  # file time once sealed (for age retention)
        self.future_seen: int | None = None  # when a future-stamped time was first seen
        self.idx_off: array[int] = array("q")
        self.idx_pos: array[int] = array("q")
        self.idx_ts: array[int] = array("q")
        self.bad: dict[int, BadRegion] = {}
        self._rfd: int | None = None
        self._readers = 0
        self._rfd_closing = False
        self.wfd: int | None = None
        self._idx_written = 0  # index entries already in the index file
        self._idx_dirty = False  # the file holds entries no longer in memory: rewrite it
        self._last_index_pos = -(1 << 62)

    # -- reading ------------------------------------------------------------------------

    def pread(self, length: int, position: int) -> bytes:
        """Read up to ``length`` bytes at ``position`` (short only at end of file).

        The read descriptor comes from :data:`READ_FDS` (opened on demand, LRU-bounded).
        """
        fd = READ_FDS.borrow(self)
        try:
            return os.pread(fd, length, position)
        finally:
            READ_FDS.give_back(self)

    def file_size(self) -> int:
        """The current size of the file on disk (may include a partial write)."""
        return os.stat(self.path).st_size

    def mtime_ns(self) -> int | None:
        """The file's modification time (when its last record was written), None if gone."""
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def locate(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the last indexed batch starting at or before ``offset``."""
        i = bisect.bisect_right(self.idx_off, offset) - 1
        if i < 0:
            return self.base, 0
        return self.idx_off[i], self.idx_pos[i]

    def locate_time(self, ts: int, limit: int = 1 << 62) -> int:
        """Position of the last indexed batch before the first one stamped in ``[ts, limit]``.

        Stamps need not be monotonic (explicit timestamps, wall-clock jumps); one beyond
        ``limit`` (a bogus future stamp) is passed over, never taken as a match. A linear
        scan of the index: a rare call.
        """
        best = 0
        for i, t in enumerate(self.idx_ts):
            if t < ts or t > limit:
                best = self.idx_pos[i]
            else:
                break
        return best

    # -- scanning and recovery ----------------------------------------------------------

    def scan(self, start: int, start_offset: int, end: int, *, build_index: bool) -> ScanResult:
        """Verify every batch from ``start`` to ``end`` (checksums included).

        A damaged batch followed by a valid one is recorded as a :class:`BadRegion` (the
        good data after it is kept); a damaged or cut-short run at the end is a torn tail.
        """
        buf = self.pread(end - start, start) if end > start else b""
        end_rel = len(buf)
        pos = 0
        expected = start_offset
        res = ScanResult(end=start, next_offset=start_offset, last_ts=None)
        while pos < end_rel:
            try:
                hdr = fmt.check_batch(buf, pos, end_rel)
                if hdr.base_offset != expected:
                    raise fmt.FrameError(
                        f"batch offset {hdr.base_offset} where {expected} was expected")
            except fmt.FrameError as exc:
                found = fmt.find_next_batch(buf, pos + 1, end_rel, expected)
                if found is None:
                    res.torn_at = start + pos
                    res.torn_reason = exc.reason
                    break
                npos, nhdr = found
                region = BadRegion(start + pos, start + npos, expected, nhdr.base_offset,
                                   exc.reason)
                res.bad.append(region)
                pos, expected = npos, nhdr.base_offset
                continue
            if build_index:
                self._note_index(hdr.base_offset, start + pos, hdr.timestamp_ns)
            if self.first_ts is None:
                self.first_ts = hdr.timestamp_ns
            if self.max_ts is None or hdr.timestamp_ns > self.max_ts:
                self.max_ts = hdr.timestamp_ns
            res.last_ts = hdr.timestamp_ns
            pos += hdr.length
            expected = hdr.next_offset
            res.end = start + pos
            res.next_offset = expected
        return res

    def load_index(self) -> bool:
        """Load the index file; False when it is missing or inconsistent (then rebuild)."""
        try:
            with open(self.index_path, "rb") as f:
                entries = fmt.decode_index(f.read())
        except FileNotFoundError:
            return False
        size = self.file_size()
        prev_off, prev_pos = self.base - 1, -1
        for off, pos, _ts in entries:
            if off <= prev_off or pos <= prev_pos or pos >= size:
                return False
            prev_off, prev_pos = off, pos
        if entries and (entries[0][0] != self.base or entries[0][1] != 0):
            return False
        self.idx_off = array("q", (e[0] for e in entries))
        self.idx_pos = array("q", (e[1] for e in entries))
        self.idx_ts = array("q", (e[2] for e in entries))
        if entries:
            self.first_ts = entries[0][2]
            self.max_ts = max(self.idx_ts)
            self._last_index_pos = entries[-1][1]
        self._idx_written = len(entries)
        return True

    def reset_index(self) -> None:
        """Forget the in-memory index (before a rebuild by scanning)."""
        self.idx_off, self.idx_pos, self.idx_ts = array("q"), array("q"), array("q")
        self._last_index_pos = -(1 << 62)
        self.first_ts = None
        self.max_ts = None
        self._idx_dirty = True

    def trim_index(self, end: int) -> None:
        """Drop index entries at or beyond byte ``end``."""
        i = bisect.bisect_left(self.idx_pos, end)
        del self.idx_off[i:], self.idx_pos[i:], self.idx_ts[i:]
        self._last_index_pos = self.idx_pos[-1] if self.idx_pos else -(1 << 62)
        if i < self._idx_written:
            self._idx_dirty = True

    def _note_index(self, offset: int, position: int, ts: int) -> bool:
        if position - self._last_index_pos < self.index_interval:
            return False
        self.idx_off.append(offset)
        self.idx_pos.append(position)
        self.idx_ts.append(ts)
        self._last_index_pos = position
        return True

    def save_index(self) -> None:
        """Rewrite the index file atomically from memory (temp file + rename)."""
        tmp = self.index_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(fmt.encode_index_entry(o, p, t)
                             for o, p, t in zip(self.idx_off, self.idx_pos, self.idx_ts,
                                                strict=True)))
        os.replace(tmp, self.index_path)
        self._idx_written = len(self.idx_off)
        self._idx_dirty = False

    def flush_index(self) -> None:
        """Write the buffered index entries to the index file (errors are ignored: the
        index is rebuilt from the segment on recovery)."""
        try:
            if self._idx_dirty:
                self.save_index()
                return
            n = len(self.idx_off)
            if self._idx_written >= n:
                return
            data = b"".join(fmt.encode_index_entry(self.idx_off[i], self.idx_pos[i],
                                                   self.idx_ts[i])
                            for i in range(self._idx_written, n))
            fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self._idx_written = n
        except OSError:
            pass  # a full disk must not fail an append or a close here

    # -- writing ------------------------------------------------------------------------

    def open_for_append(self) -> None:
        """Open the write descriptor; the file is positioned at ``size``."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.lseek(fd, self.size, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        self.wfd = fd

    def close_write(self) -> None:
        """Close the write descriptor (no fsync); :meth:`open_for_append` reopens it."""
        fd, self.wfd = self.wfd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def write_batch(self, data: bytes, base_offset: int, count: int, ts: int) -> None:
        """Append one framed batch; on any error the file is cut back to its previous size.

        Raises:
            OSError: from the operating system, after the partial batch was removed.
        """
        assert self.wfd is not None
        pos = self.size
        try:
            write_all(self.wfd, data)
        except BaseException:
            self._undo(pos)
            raise
        if self.first_ts is None:
            self.first_ts = ts
        self.last_ts = ts
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
        self.size = pos + len(data)
        self.next_offset = base_offset + count
        if self._note_index(base_offset, pos, ts) and \
                len(self.idx_off) - self._idx_written >= INDEX_BUFFER:
            self.flush_index()

    def _undo(self, pos: int) -> None:
        assert self.wfd is not None
        try:
            os.ftruncate(self.wfd, pos)
            os.lseek(self.wfd, pos, os.SEEK_SET)
        except OSError as exc:  # pragma: no cover - cannot shrink a file: report, keep state
            log.error("could not remove a partial batch from %s at %d: %s", self.path, pos, exc)

    def seal(self, sync: bool) -> None:
        """Close the write side (after an optional fsync); add the final index entry.

        Works whether or not the write descriptor is open (it may have been closed to keep
        the process's descriptors bounded).
        """
        if self.wfd is None:
            self.wfd = os.open(self.path, os.O_WRONLY)
        if self.idx_pos and self.size > 0:
            last = self._last_batch()
            if last is not None and last[1] > self.idx_pos[-1]:
                self.idx_off.append(last[0])
                self.idx_pos.append(last[1])
                self.idx_ts.append(last[2])
                self._last_index_pos = last[1]
        self.flush_index()
        if sync:
            os.fsync(self.wfd)
        os.close(self.wfd)
        self.wfd = None

    def _last_batch(self) -> tuple[int, int, int] | None:
        off, pos = self.idx_off[-1], self.idx_pos[-1]
        last = None
        buf = self.pread(self.size - pos, pos)
        p = 0
        while p < len(buf):
            try:
                hdr = fmt.read_header(buf, p)
            except fmt.FrameError:
                break
            last = (hdr.base_offset, pos + p, hdr.timestamp_ns)
            p += hdr.length
        return last if last is not None else (off, pos, self.idx_ts[-1])

    def close(self) -> None:
        """Close every descriptor (no fsync); buffered index entries are written first."""
        if self.wfd is not None or len(self.idx_off) > self._idx_written or self._idx_dirty:
            self.flush_index()
        self.close_write()
        READ_FDS.drop(self)

    def delete(self) -> None:
        """Close and remove the segment and its index from disk."""
        self.close()
        for p in (self.path, self.index_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def is_full(exc: OSError) -> bool:
    """True when ``exc`` means the disk or the file size limit is full."""
    return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
