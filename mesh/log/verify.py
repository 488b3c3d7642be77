"""Read-only full scan of a log directory: every batch, every checksum, every gap."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.log import format as fmt


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a log, with its location.

    Attributes:
        kind: ``"corrupt"`` (damaged batch with good data after it), ``"torn"`` (damaged or
            cut-short tail, which the next writer truncates), ``"gap"`` (offsets missing
            between segments), ``"index"`` (an index that will be rebuilt; not data loss).
        path: the file.
        position: byte position in that file.
        reason: what check failed.
    """

    kind: str
    path: str
    position: int
    reason: str


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
        return not any(p.kind != "index" for p in self.problems)


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
    bases = sorted(b for b in (fmt.parse_segment_name(n) for n in os.listdir(path))
                   if b is not None)
    expected: int | None = None
    for base in bases:
        seg_path = os.path.join(path, fmt.segment_name(base))
        with open(seg_path, "rb") as f:
            buf = f.read()
        rep.segments += 1
        rep.bytes += len(buf)
        if expected is not None and base != expected:
            if base > expected:
                rep.problems.append(Problem("gap", seg_path, 0,
                                            f"offsets {expected}..{base - 1} missing"))
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
                                                f"{exc.reason}; {len(buf) - pos} bytes to end"))
                    break
                rep.problems.append(Problem("corrupt", seg_path, pos,
                                            f"{exc.reason}; offsets {cur}.."
                                            f"{found[1].base_offset - 1} unreadable"))
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
    return rep


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
