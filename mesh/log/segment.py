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
from array import array
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

    def __init__(self, directory: str, base: int, index_interval: int) -> None:
        self.base = base
        self.path = os.path.join(directory, fmt.segment_name(base))
        self.index_path = os.path.join(directory, fmt.index_name(base))
        self.index_interval = index_interval
        self.size = 0
        self.next_offset = base
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.idx_off: array[int] = array("q")
        self.idx_pos: array[int] = array("q")
        self.idx_ts: array[int] = array("q")
        self.bad: dict[int, BadRegion] = {}
        self._rfd: int | None = None
        self.wfd: int | None = None
        self._ifd: int | None = None
        self._last_index_pos = -(1 << 62)

    # -- reading ------------------------------------------------------------------------

    def rfd(self) -> int:
        """A read-only descriptor for positioned reads (shared; pread has no file position)."""
        if self._rfd is None:
            self._rfd = os.open(self.path, os.O_RDONLY)
        return self._rfd

    def pread(self, length: int, position: int) -> bytes:
        """Read up to ``length`` bytes at ``position`` (short only at end of file)."""
        return os.pread(self.rfd(), length, position)

    def file_size(self) -> int:
        """The current size of the file on disk (may include a partial write)."""
        return os.fstat(self.rfd()).st_size

    def locate(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the last indexed batch starting at or before ``offset``."""
        i = bisect.bisect_right(self.idx_off, offset) - 1
        if i < 0:
            return self.base, 0
        return self.idx_off[i], self.idx_pos[i]

    def locate_time(self, ts: int) -> int:
        """Position of the last indexed batch with a timestamp before ``ts`` (0 if none)."""
        # Timestamps are non-decreasing within a log unless the caller supplies older ones;
        # a linear scan of the index tolerates that at a small cost for a rare call.
        best = 0
        for i, t in enumerate(self.idx_ts):
            if t < ts:
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
            self._last_index_pos = entries[-1][1]
        return True

    def reset_index(self) -> None:
        """Forget the in-memory index (before a rebuild by scanning)."""
        self.idx_off, self.idx_pos, self.idx_ts = array("q"), array("q"), array("q")
        self._last_index_pos = -(1 << 62)
        self.first_ts = None

    def trim_index(self, end: int) -> None:
        """Drop index entries at or beyond byte ``end``."""
        i = bisect.bisect_left(self.idx_pos, end)
        del self.idx_off[i:], self.idx_pos[i:], self.idx_ts[i:]
        self._last_index_pos = self.idx_pos[-1] if self.idx_pos else -(1 << 62)

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

    # -- writing ------------------------------------------------------------------------

    def open_for_append(self) -> None:
        """Open the write descriptors; the file is positioned at ``size``."""
        self.wfd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.lseek(self.wfd, self.size, os.SEEK_SET)
        self._ifd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

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
        self.size = pos + len(data)
        self.next_offset = base_offset + count
        if self._note_index(base_offset, pos, ts):
            assert self._ifd is not None
            try:
                os.write(self._ifd, fmt.encode_index_entry(base_offset, pos, ts))
            except OSError:
                pass  # the index is rebuildable from the segment; a full disk must not fail here

    def _undo(self, pos: int) -> None:
        assert self.wfd is not None
        try:
            os.ftruncate(self.wfd, pos)
            os.lseek(self.wfd, pos, os.SEEK_SET)
        except OSError as exc:  # pragma: no cover - cannot shrink a file: report, keep state
            log.error("could not remove a partial batch from %s at %d: %s", self.path, pos, exc)

    def seal(self, sync: bool) -> None:
        """Close the write side (after an optional fsync); add the final index entry."""
        if self.wfd is None:
            return
        if self.idx_pos and self.size > 0:
            last = self._last_batch()
            if last is not None and last[1] > self.idx_pos[-1]:
                self.idx_off.append(last[0])
                self.idx_pos.append(last[1])
                self.idx_ts.append(last[2])
                self._last_index_pos = last[1]
                try:
                    assert self._ifd is not None
                    os.write(self._ifd, fmt.encode_index_entry(*last))
                except OSError:
                    pass
        if sync:
            os.fsync(self.wfd)
        os.close(self.wfd)
        self.wfd = None
        if self._ifd is not None:
            os.close(self._ifd)
            self._ifd = None

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
        """Close every descriptor (no fsync)."""
        for name in ("wfd", "_ifd", "_rfd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

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
