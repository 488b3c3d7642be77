"""Writer epochs of a log: which incarnation of the writer assigned which offsets.

Offsets of a log are its stream's seqs. A writer that lost its unsynced tail (a power cut), the
last segment, or the whole directory (wiped, or restored from an older backup) would hand out
offsets that subscribers already passed, now for different events. Epochs make that visible,
the way Kafka's leader epochs do: every writer open starts a new epoch, a random non-zero
32-bit id, recorded with the offset it starts at in the ``EPOCHS`` file (fsynced before the
first record of the epoch is). The history is a list of ``(epoch, start_offset)`` in the order
the epochs began; each epoch's records end where the next epoch starts.

A reader that processed up to ``pos`` under epoch ``E`` asks the writer for the *divergence*
point (:meth:`EpochHistory.divergence`): the first offset at which what it saw may differ from
what the log now holds. Below that point its view and the log agree; from there on it must read
again (and count what it saw that the log no longer has).

Epoch 0 is reserved: it names records written before this file existed (a log created by an
older version), and positions committed without an epoch.

File format (text, ASCII, one line each; replaced atomically by write-to-temp, fsync, rename,
fsync of the directory)::

    zeromesh-epochs 1
    <epoch> <start_offset>
    ...
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence

log = logging.getLogger("mesh.log")

EPOCHS_NAME = "EPOCHS"
_MAGIC = "zeromesh-epochs 1"
#: The most epochs kept in the file; older entries are merged away (see _compact).
MAX_EPOCHS = 1000


class EpochHistory:
    """The ordered ``(epoch, start_offset)`` entries of one log (read-only view + lookups)."""

    def __init__(self, entries: Sequence[tuple[int, int]]) -> None:
        self.entries: list[tuple[int, int]] = [(int(e), int(s)) for e, s in entries]

    @property
    def current(self) -> int:
        """The epoch of the newest entry (0 when there is none)."""
        return self.entries[-1][0] if self.entries else 0

    def end_of(self, epoch: int) -> int | None:
        """Where ``epoch``'s records end (the next epoch's start); None: it is the current
        epoch (no end yet) or unknown (see :meth:`knows`)."""
        ents = self.entries
        for i in range(len(ents) - 1, -1, -1):
            if ents[i][0] == epoch:
                return ents[i + 1][1] if i + 1 < len(ents) else None
        return None

    def knows(self, epoch: int) -> bool:
        """True when ``epoch`` is in the history."""
        return any(e == epoch for e, _ in self.entries)

    def divergence(self, epoch: int | None, pos: int) -> int:
        """The first offset where a reader at ``pos`` under ``epoch`` may disagree with the log.

        ``epoch`` None means "no epoch known" (a position from an older version): trusted as
        it is. A known epoch ends where the next one starts; an unknown one (its history was
        lost with the directory, or restored from an older backup) is trusted only up to the
        start of the newest epoch that began at or before ``pos``.
        """
        if epoch is None:
            return pos
        if self.knows(epoch):
            end = self.end_of(epoch)
            return pos if end is None else min(pos, end)
        starts = [s for _e, s in self.entries if s <= pos]
        return min(pos, max(starts)) if starts else 0

    def since(self, offset: int) -> list[tuple[int, int]]:
        """The entries whose records include or follow ``offset`` (for replay replies)."""
        ents = self.entries
        i = 0
        for j, (_e, s) in enumerate(ents):
            if s <= offset:
                i = j
        return ents[i:]


def load(path: str) -> list[tuple[int, int]] | None:
    """The entries of the ``EPOCHS`` file in log directory ``path``; None when there is none
    or it is unreadable (logged)."""
    fp = os.path.join(path, EPOCHS_NAME)
    try:
        with open(fp, encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("log %s: epoch history unreadable (%s); starting a new one", path, exc)
        return None
    lines = text.splitlines()
    if not lines or lines[0] != _MAGIC:
        log.warning("log %s: epoch history %s is damaged; starting a new one", path, fp)
        return None
    out: list[tuple[int, int]] = []
    for line in lines[1:]:
        parts = line.split()
        try:
            e, s = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            log.warning("log %s: damaged line in %s ignored: %r", path, fp, line[:80])
            continue
        if 0 <= e < 1 << 32 and s >= 0:
            out.append((e, s))
    return out


def _compact(entries: list[tuple[int, int]]) -> list[tuple[int, int]]:
    # Bound the file: drop the oldest entries beyond MAX_EPOCHS. A reader whose epoch was
    # dropped is then "unknown" and trusted up to the newest start at or before its position,
    # which for a position in an old epoch is that epoch's own start or later: conservative.
    return entries[-MAX_EPOCHS:]


def save(path: str, entries: list[tuple[int, int]], *, sync: bool = True) -> None:
    """Replace the ``EPOCHS`` file of log directory ``path`` atomically.

    Raises:
        OSError: the file could not be written.
    """
    fp = os.path.join(path, EPOCHS_NAME)
    tmp = fp + ".tmp"
    body = "\n".join([_MAGIC, *(f"{e} {s}" for e, s in entries)]) + "\n"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(body)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, fp)
    if sync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync(path: str) -> None:
    """fsync the ``EPOCHS`` file of log directory ``path`` (its directory entry is synced
    with the directory, by the caller).

    Raises:
        OSError: the fsync failed.
    """
    fd = os.open(os.path.join(path, EPOCHS_NAME), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(path: str, next_offset: int, has_records: bool, *, sync: bool = True) -> EpochHistory:
    """Start a new writer epoch at ``next_offset`` and write it before any append (with
    ``sync`` False the caller must :func:`sync` it, and the directory, before the first
    record of the epoch is made durable).

    A log with records but no history (written by a version without epochs) gets the entry
    ``(0, first)`` for them first.

    Raises:
        OSError: the history could not be written.
    """
    entries = load(path)
    if entries is None:
        entries = [(0, 0)] if has_records else []
    # Entries starting at or after the new start describe offsets the log no longer holds
    # (a lost tail): keep them; they are what tells a reader its epoch ended earlier. But an
    # entry that starts beyond next_offset would make the lookups non-monotonic, so clamp.
    entries = [(e, min(s, next_offset)) for e, s in entries]
    used = {e for e, _ in entries}
    epoch = 0
    while epoch == 0 or epoch in used:
        epoch = secrets.randbits(32)
    entries.append((epoch, next_offset))
    entries = _compact(entries)
    save(path, entries, sync=sync)
    return EpochHistory(entries)
