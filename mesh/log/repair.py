"""Cut damaged (or chosen) offset ranges out of a log, leaving a recorded hole.

After :func:`repair_log` the log opens and reads cleanly: the cut range is a gap between two
segments, which reads report as :class:`~mesh.errors.LogCorruptedRange` (``offset`` = the
first cut offset, ``next_offset`` = the first offset after it) exactly as for a deleted
middle segment, and the range is listed as a ``hole`` in the log's ``MARKER`` so that
``mesh log verify`` no longer counts it as damage. Offsets are never reused: when a cut
reaches the end of the log, an empty segment keeps the next offset where it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
from dataclasses import dataclass, field

from mesh.errors import LogCorrupted, LogError, LogLocked
from mesh.log import format as fmt
from mesh.log.log import LOCK_NAME, MARKER_NAME, read_marker, write_json_atomic


@dataclass
class Cut:
    """One range removed from a segment file."""

    offset: int  # first offset removed
    next_offset: int  # first offset kept after it
    path: str
    position: int  # byte range removed from that file
    end_position: int
    reason: str


@dataclass
class RepairReport:
    """What :func:`repair_log` did."""

    path: str
    cuts: list[Cut] = field(default_factory=list)
    acknowledged: list[tuple[int, int, str]] = field(default_factory=list)
    finished_interrupted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when anything was cut or acknowledged."""
        return bool(self.cuts or self.acknowledged or self.finished_interrupted)


@dataclass
class _Batch:
    pos: int
    end: int
    offset: int
    next_offset: int
    good: bool
    reason: str = ""


def _scan(buf: bytes, base: int) -> list[_Batch]:
    out: list[_Batch] = []
    pos, cur = 0, base
    while pos < len(buf):
        try:
            hdr = fmt.check_batch(buf, pos)
            if hdr.base_offset != cur:
                raise fmt.FrameError(f"batch offset {hdr.base_offset} where {cur} expected")
        except fmt.FrameError as exc:
            found = fmt.find_next_batch(buf, pos + 1, len(buf), cur)
            if found is None:
                break  # a torn tail: the writer's open truncates it
            out.append(_Batch(pos, found[0], cur, found[1].base_offset, False, exc.reason))
            pos, cur = found[0], found[1].base_offset
            continue
        out.append(_Batch(pos, pos + hdr.length, cur, hdr.next_offset, True))
        pos += hdr.length
        cur = hdr.next_offset
    return out


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_segment(directory: str, base: int, data: bytes) -> str:
    final = os.path.join(directory, fmt.segment_name(base))
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def repair_log(path: str, cut: tuple[int, int] | None = None) -> RepairReport:
    """Cut damaged ranges (or offsets ``cut = (first, last)``, inclusive) out of the log.

    Without ``cut``: every damaged batch run in the middle of a segment is cut out, and known
    gaps and lost ranges are acknowledged as holes. With ``cut``: the batches holding any of
    those offsets are cut (whole batches, so the cut may be a little wider; the report says
    exactly what was cut). The writer lock is held throughout: stop the stream's writer
    first. A repair interrupted between its two file steps is finished by running it again.

    Raises:
        LogLocked: a process writes this log.
        LogError: the directory is not a log, or a file cannot be rewritten.
    """
    if not os.path.isdir(path):
        raise LogError(f"no log directory at {path}")
    lock_path = os.path.join(path, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LogLocked(lock_path, f"pid {holder}" if holder else None) from exc
            raise
        try:
            return _repair_locked(path, cut)
        except OSError as exc:
            raise LogError(f"cannot repair log {path}: {exc}") from exc
    finally:
        os.close(fd)  # drops the lock


def _bases(path: str) -> list[int]:
    return sorted(b for b in (fmt.parse_segment_name(n) for n in os.listdir(path))
                  if b is not None)


def _repair_locked(path: str, cut: tuple[int, int] | None) -> RepairReport:
    rep = RepairReport(path)
    try:
        marker = dict(read_marker(path) or {})
    except ValueError:
        marker = {}
    _finish_interrupted(path, rep)
    bases = _bases(path)
    if cut is not None and cut[0] > cut[1]:
        raise LogError(f"--cut {cut[0]}..{cut[1]}: the first offset is after the last")
    holes: list[list[object]] = list(marker.get("holes") or [])  # type: ignore[call-overload]
    prev_next: int | None = None
    last_next = 0
    for i, base in enumerate(bases):
        seg_path = os.path.join(path, fmt.segment_name(base))
        with open(seg_path, "rb") as f:
            buf = f.read()
        batches = _scan(buf, base)
        if prev_next is not None and base > prev_next and cut is None:
            known = any(h[0] == prev_next and h[1] == base for h in holes)
            if not known:
                rep.acknowledged.append((prev_next, base, "missing segment"))
                holes.append([prev_next, base, "missing segment, acknowledged by repair"])
        seg_next = batches[-1].next_offset if batches else base
        last_next = seg_next
        prev_next = seg_next

        def doomed(b: _Batch) -> bool:
            if cut is None:
                return not b.good
            return b.offset <= cut[1] and b.next_offset > cut[0]

        if not any(doomed(b) for b in batches):
            continue
        # Runs of kept batches, each becoming a segment that starts at its first offset.
        runs: list[list[_Batch]] = []
        removed: list[list[_Batch]] = []
        prev: bool | None = None
        for b in batches:  # batches are contiguous in the file: split into same-kind runs
            d = doomed(b)
            target = removed if d else runs
            if prev is d:
                target[-1].append(b)
            else:
                target.append([b])
            prev = d
        for r in removed:
            a, z = r[0].offset, r[-1].next_offset
            reason = "; ".join(sorted({b.reason for b in r if b.reason})) or "cut on request"
            rep.cuts.append(Cut(a, z, seg_path, r[0].pos, r[-1].end, reason))
            holes.append([a, z, f"cut by repair: {reason}"])
        # New segments first (fsynced), then the original shrinks or goes: an interruption
        # leaves overlapping segments, which the next repair finishes (_finish_interrupted).
        head = runs[0] if runs and runs[0][0].pos == 0 else None
        for r in runs:
            if r is head:
                continue
            _write_segment(path, r[0].offset, buf[r[0].pos : r[-1].end])
        is_last = i == len(bases) - 1
        if is_last and (not runs or runs[-1][-1].next_offset < seg_next):
            # The cut reaches the end: keep the next offset (an empty segment holds it).
            _write_segment(path, seg_next, b"")
        _fsync_path(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, fmt.index_name(base)))
        if head is not None:
            os.truncate(seg_path, head[-1].end)
            _fsync_path(seg_path)
        else:
            os.unlink(seg_path)
        _fsync_path(path)
    reach = marker.get("next_offset")
    if cut is None and isinstance(reach, int) and reach > last_next:
        # A lost tail (deleted or cut-back last segment): an empty segment at the offset
        # the log had reached keeps those offsets from being handed out again.
        start = last_next if bases else int(marker.get("first_offset") or 0)  # type: ignore[call-overload]
        _write_segment(path, reach, b"")
        _fsync_path(path)
        rep.acknowledged.append((start, reach, "lost tail"))
        holes.append([start, reach, "lost tail, acknowledged by repair"])
        last_next = reach
    if cut is None:
        for e in marker.get("lost") or []:  # type: ignore[attr-defined]
            rep.acknowledged.append((int(e[0]), int(e[1]), "lost tail"))
            holes.append([int(e[0]), int(e[1]), "lost tail, acknowledged by repair"])
        marker["lost"] = []
    if not rep.changed:
        return rep
    bases = _bases(path)
    marker.update({"version": 1, "holes": holes,
                   "next_offset": max(last_next, reach if isinstance(reach, int) else 0),
                   "max_base": bases[-1] if bases else 0,
                   "first_offset": bases[0] if bases else 0})
    marker.setdefault("lost", [])
    write_json_atomic(os.path.join(path, MARKER_NAME), marker, True)
    _fsync_path(path)
    return rep


def _finish_interrupted(path: str, rep: RepairReport) -> None:
    # Overlapping segments are what an interrupted repair leaves: the later one holds the
    # tail copied out of the earlier one, which is cut back to just before it.
    bases = _bases(path)
    for a, b in itertools.pairwise(bases):
        seg_path = os.path.join(path, fmt.segment_name(a))
        with open(seg_path, "rb") as f:
            buf = f.read()
        batches = _scan(buf, a)
        if not batches or batches[-1].next_offset <= b:
            continue
        keep = [x for x in batches if x.next_offset <= b and x.good]
        cut_at = keep[-1].end if keep else 0
        if any(x.offset < b < x.next_offset for x in batches):
            raise LogCorrupted(seg_path, 0, f"segment overlaps the next one at offset {b} "
                               "mid-batch; this is not what a repair leaves")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, fmt.index_name(a)))
        if cut_at:
            os.truncate(seg_path, cut_at)
            _fsync_path(seg_path)
        else:
            os.unlink(seg_path)
        _fsync_path(path)
        rep.finished_interrupted.append(seg_path)
