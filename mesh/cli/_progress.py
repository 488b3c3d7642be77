"""A plain progress line on stderr (``\\r``-rewritten), shown only when stderr is a TTY.

Scripts and pipes see nothing; a person watching a long verification or replay sees
``verify  412.0/980.5 MiB  42%  3/7 streams``. Updates are throttled to 10 per second so the
progress line never costs more than the work.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


class Progress:
    """``with Progress("verify", total_bytes, items=7) as p: ...; p.advance(n, item=True)``."""

    def __init__(self, label: str, total: int, *, items: int | None = None,
                 stream: IO[str] | None = None, force: bool = False) -> None:
        self.label = label
        self.total = max(0, total)
        self.items = items
        self.done = 0
        self.items_done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def advance(self, n: int = 0, *, item: bool = False) -> None:
        """Count ``n`` more units (bytes) and, with ``item``, one more item."""
        self.done += n
        if item:
            self.items_done += 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw()

    def _draw(self) -> None:
        mib = 1 << 20
        pct = 100 * self.done / self.total if self.total else 100.0
        line = f"{self.label}  {self.done / mib:.1f}/{self.total / mib:.1f} MiB  {pct:3.0f}%"
        if self.items is not None:
            line += f"  {self.items_done}/{self.items}"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the line (the command's real output follows)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StatusLine:
    """A one-line ``\r`` status on stderr (TTY only), redrawn at most 10 times a second."""

    def __init__(self, stream: IO[str] | None = None, force: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def due(self) -> bool:
        """True when a redraw would be drawn now (compute the text only then)."""
        return self.enabled and time.monotonic() - self._last >= 0.1

    def show(self, text: str) -> None:
        """Draw ``text`` (throttled)."""
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line before other output."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def dir_bytes(path: str) -> int:
    """Total size of the files under ``path`` (0 if missing)."""
    import os

    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def segment_bytes(path: str) -> int:
    """Total size of the log segments (not the indexes) of the stream directory ``path``: the
    bytes :func:`mesh.log.verify.verify_log` scans and reports through its progress callback."""
    import os

    from mesh.log import format as fmt

    total = 0
    try:
        names = os.listdir(path)
    except OSError:
        return 0
    for n in names:
        if fmt.parse_segment_name(n) is not None:
            try:
                total += os.path.getsize(os.path.join(path, n))
            except OSError:
                pass
    return total


def over_dirs(label: str, items: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Yield ``(name, path)`` pairs, advancing a progress line by each directory's size."""
    pairs = list(items)
    sizes = {p: dir_bytes(p) for _, p in pairs} if sys.stderr.isatty() else {}
    with Progress(label, sum(sizes.values()), items=len(pairs)) as prog:
        for name, path in pairs:
            yield name, path
            prog.advance(sizes.get(path, 0), item=True)
