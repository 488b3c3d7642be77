"""Read-only full scan of a log directory: every batch, every checksum, every gap."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.log import format as fmt
from mesh.log.log import MARKER_NAME, read_marker


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a log, with its location.

    Attributes:
        kind: ``"corrupt"`` (damaged batch with good data after it), ``"torn"`` (damaged or
            cut-short tail, which the next writer truncates), ``"gap"`` (offsets missing
            between segments: a deleted middle segment), ``"lost"`` (the log once reached
            further than it now holds: a deleted or cut-back last segment, per its
            ``MARKER``), ``"index"`` (an index that will be rebuilt; not data loss),
            ``"hole"`` (a range cut out or acknowledged by ``mesh log repair``; not a
            problem any more), ``"marker"`` (an unreadable ``MARKER``; not data loss),
            ``"missing"`` (a work queue's log whose partner is gone: a ``<queue>.journal``
            with records but no ``<queue>.tasks``, every owed task lost, or a
            ``<queue>.tasks`` with records but no journal, every acked task would run
            again).
        path: the file.
        position: byte position in that file.
        reason: what check failed.
        offset: the first offset affected (None when unknown).
        next_offset: the first offset after the affected range (None when unknown).
    """

    kind: str
    path: str
    position: int
    reason: str
    offset: int | None = None
    next_offset: int | None = None

    @property
    def range_text(self) -> str:
        """``"offsets a..b"`` (inclusive) or ``""`` when the range is unknown."""
        if self.offset is None:
            return ""
        end = "?" if self.next_offset is None else str(self.next_offset - 1)
        return f"offsets {self.offset}..{end}"


#: Problem kinds that are not data damage.
NOT_DAMAGE = frozenset({"index", "hole", "marker"})


@dataclass
class VerifyReport:
    """What :func:`verify_log` found."""

    path: str
    segments: int = 0
    batches: int = 0
    records: int = 0
    bytes: int = 0
    first_offset: int | None = None
    next_offset: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no data problem was found (index notes do not count)."""
        return not any(p.kind not in NOT_DAMAGE for p in self.problems)


#: Scanned bytes between two progress callbacks inside one segment.
PROGRESS_STEP = 4 << 20


def verify_log(path: str, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Scan every segment of the log in ``path`` without modifying anything.

    Safe while a writer runs, except that a batch being written at that moment may be
    reported as a torn tail.

    Args:
        path: the stream's directory.
        progress: called with the number of segment bytes scanned since its last call (about
            every :data:`PROGRESS_STEP` bytes within a segment, and at each segment's end);
            the calls of one scan add up to ``VerifyReport.bytes``.
    """
    rep = VerifyReport(path)
    # The marker first: a writer rolling meanwhile only makes the listing newer than it.
    marker_path = os.path.join(path, MARKER_NAME)
    try:
        marker = read_marker(path) or {}
    except ValueError as exc:
        rep.problems.append(Problem("marker", marker_path, 0, str(exc)))
        marker = {}
    bases = sorted(b for b in (fmt.parse_segment_name(n) for n in os.listdir(path))
                   if b is not None)
    holes = {(h[0], h[1]) for h in _entries(marker, "holes")}
    expected: int | None = None
    for base in bases:
        seg_path = os.path.join(path, fmt.segment_name(base))
        with open(seg_path, "rb") as f:
            buf = f.read()
        rep.segments += 1
        rep.bytes += len(buf)
        if expected is not None and base != expected:
            if base > expected and (expected, base) in holes:
                rep.problems.append(Problem("hole", seg_path, 0, "cut out by mesh log repair",
                                            expected, base))
            elif base > expected:
                rep.problems.append(Problem("gap", seg_path, 0,
                                            f"offsets {expected}..{base - 1} missing (a "
                                            "segment was deleted or lost)", expected, base))
            else:
                rep.problems.append(Problem("corrupt", seg_path, 0,
                                            f"segment starts at {base}, overlaps up to "
                                            f"{expected - 1}"))
        if rep.first_offset is None:
            rep.first_offset = base
        cur, pos = base, 0
        reported = 0  # bytes of this segment already given to progress
        positions: set[int] = set()
        while pos < len(buf):
            if progress is not None and pos - reported >= PROGRESS_STEP:
                progress(pos - reported)
                reported = pos
            try:
                hdr = fmt.check_batch(buf, pos)
                if hdr.base_offset != cur:
                    raise fmt.FrameError(f"batch offset {hdr.base_offset} where {cur} expected")
            except fmt.FrameError as exc:
                found = fmt.find_next_batch(buf, pos + 1, len(buf), cur)
                if found is None:
                    rep.problems.append(Problem("torn", seg_path, pos,
                                                f"{exc.reason}; {len(buf) - pos} bytes to end",
                                                cur, None))
                    break
                rep.problems.append(Problem("corrupt", seg_path, pos,
                                            f"{exc.reason}; offsets {cur}.."
                                            f"{found[1].base_offset - 1} unreadable", cur,
                                            found[1].base_offset))
                pos, cur = found[0], found[1].base_offset
                continue
            positions.add(pos)
            rep.batches += 1
            rep.records += hdr.records
            cur = hdr.next_offset
            pos += hdr.length
        if progress is not None and len(buf) > reported:
            progress(len(buf) - reported)  # the rest, including a torn tail not scanned
        expected = cur
        rep.problems.extend(_check_index(path, base, positions))
    rep.next_offset = expected
    _check_reach(rep, marker, marker_path, bases)
    _check_queue_pair(rep)
    return rep


def _has_log(path: str) -> bool:
    try:
        return any(fmt.parse_segment_name(n) is not None for n in os.listdir(path))
    except OSError:
        return False


def _check_queue_pair(rep: VerifyReport) -> None:
    # A work queue's task log and journal live side by side (patterns.pipeline.store); one
    # without the other is a silent loss at the producer's next open unless reported here.
    path = rep.path.rstrip(os.sep)
    parent, name = os.path.split(path)
    if os.path.basename(parent) != "streams" or not rep.records:
        return
    if os.path.basename(os.path.dirname(parent)) != "queues":
        return  # only the queues' namespace: a user stream may end in .tasks
    head, dot, gen = name.rpartition(".journal")
    if name.endswith(".tasks"):
        queue = name[: -len(".tasks")]
        try:
            siblings = os.listdir(parent)
        except OSError:
            siblings = []
        if not any(n == f"{queue}.journal" or n.startswith(f"{queue}.journal.")
                   for n in siblings):
            rep.problems.append(Problem(
                "missing", os.path.join(parent, f"{queue}.journal"), 0,
                f"work queue {queue}: its journal is missing while {name} holds "
                f"{rep.records} task record(s): every acked task would run again (restore it, "
                "or open the queue with accept_loss=True)", rep.first_offset, rep.next_offset))
    elif head and dot and (gen == "" or (gen.startswith(".") and gen[1:].isdigit())):
        tasks = os.path.join(parent, f"{head}.tasks")
        if not _has_log(tasks):
            rep.problems.append(Problem(
                "missing", tasks, 0,
                f"work queue {head}: its task log is missing while {name} holds "
                f"{rep.records} journal record(s): every task still owed is lost (restore it, "
                "or open the queue with accept_loss=True)"))


def _entries(marker: dict[str, object], key: str) -> list[tuple[int, int]]:
    v = marker.get(key)
    if not isinstance(v, list):
        return []
    return [(e[0], e[1]) for e in v if isinstance(e, list) and len(e) >= 2
            and isinstance(e[0], int) and isinstance(e[1], int)]


def _check_reach(rep: VerifyReport, marker: dict[str, object], marker_path: str,
                 bases: list[int]) -> None:
    # The MARKER says how far the log durably got and which losses are known.
    for a, b in _entries(marker, "lost"):
        rep.problems.append(Problem("lost", marker_path, 0, f"offsets {a}..{b - 1} lost "
                                    "(found missing at an open; `mesh log repair` "
                                    "acknowledges it)", a, b))
    reach = marker.get("next_offset")
    if not isinstance(reach, int):
        return
    have = rep.next_offset if rep.next_offset is not None else \
        int(marker.get("first_offset") or 0)  # type: ignore[call-overload]
    if reach > have:
        rep.problems.append(Problem("lost", marker_path, 0,
                                    f"offsets {have}..{reach - 1} missing at the end: the log "
                                    f"reached offset {reach} (last segment deleted or cut "
                                    "back?)", have, reach))
        return
    top = marker.get("max_base")
    if isinstance(top, int) and (not bases or bases[-1] < top):
        rep.problems.append(Problem("lost", os.path.join(rep.path, fmt.segment_name(top)), 0,
                                    f"segment {fmt.segment_name(top)} is missing: records from "
                                    f"offset {top} on are lost (how many is unknown)", top,
                                    None))


def _check_index(path: str, base: int, positions: set[int]) -> list[Problem]:
    ipath = os.path.join(path, fmt.index_name(base))
    try:
        with open(ipath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [Problem("index", ipath, 0, "index missing (rebuilt on open)")]
    for i, (_off, pos, _ts) in enumerate(fmt.decode_index(data)):
        if pos not in positions:
            return [Problem("index", ipath, i * fmt.INDEX_ENTRY_SIZE,
                            f"entry points at byte {pos}, not a good batch (rebuilt on open)")]
    return []
