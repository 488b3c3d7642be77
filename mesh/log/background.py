"""One background thread per process for the timed work of every log.

Interval fsyncs, age retention, retention-floor upkeep: each is a task a log arms when it has
something to do (new unsynced data, a retention limit, floors to save), so an idle log costs
no wake-ups and 10,000 logs cost one thread. A task is a callable returning the delay in
seconds until it should run again, or None to stop; it runs on the background thread, never
under the scheduler's lock, and an exception is logged and ends only that task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("mesh.log")

Task = Callable[[], "float | None"]


class Scheduler:
    """A timer heap and the one daemon thread that runs its due tasks in order."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self.runs = 0  # tasks run so far (for tests and stats)

    def call_later(self, delay: float, task: Task) -> None:
        """Run ``task`` on the background thread in ``delay`` seconds."""
        when = time.monotonic() + max(0.0, delay)
        with self._cond:
            first = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._seq), task))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="mesh-log-background")
                self._thread.start()
            elif first:
                self._cond.notify()

    @property
    def pending(self) -> int:
        """How many tasks are armed."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, task = heapq.heappop(self._heap)
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
            try:
                again = task()
            except Exception:  # one failing task must not stop every log's fsyncs
                log.exception("log background task %r failed", task)
                again = None
            self.runs += 1
            if again is not None:
                self.call_later(again, task)

    def _after_fork(self) -> None:
        # The thread does not survive fork(); the child starts its own on first use.
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._thread = None


#: The process's scheduler (see the module docstring).
SCHEDULER = Scheduler()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SCHEDULER._after_fork)
