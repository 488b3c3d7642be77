"""The dispatcher: a pure state machine for one work queue on its producer.

Events come in as method calls with the current monotonic time (``now``); what the I/O layer
must do comes out as return values and as effects collected in :meth:`Dispatcher.take_effects`.
No sockets, no files, no threads, no clock of its own: every rule here (credit, deadlines,
redelivery, backoff, retry budget, per-key ordering, worker loss, forged acks, dead letters) is
unit-tested with a fake clock and a seeded RNG.

Lifecycle of a task id::

    add/restore -> PENDING --dispatch--> INFLIGHT --ack--> done (removed)
                     ^                      | nack / timeout / worker gone
                     |   (due)              v
                     +------------------ DELAYED         ...or, at max deliveries / term:
                                                          dead letter (removed)

Hot path notes (measured, see docs/architecture.md): ids are plain ints, per-task state
is one slotted object, deadlines sit in a deque (ack_wait is constant so they are appended in
order: no heap), and a history entry is written only when an attempt fails.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ConfigError

from .backoff import Backoff, RetryBudget, RetryBudgetConfig

PENDING = 0
INFLIGHT = 1
DELAYED = 2
WAITING_KEY = 3


@dataclass(frozen=True)
class DispatchConfig:
    """Rules of one queue.

    Attributes:
        ack_wait: seconds a delivery may stay un-ended before it is redelivered.
        max_deliveries: deliveries of a task before it is dead-lettered (>= 1).
        backoff: delay of a retry after a NACK without an explicit delay.
        retry_budget: token bucket on retries (NACK and deadline redeliveries) per queue.
        per_key_ordering: tasks with the same non-None key go to one worker at a time, in
            push order; a key stays held through a task's retries until it is acked or dead.
        prefer_other_worker: redeliver a task to a different worker when one has credit.
        max_batch: most deliveries put in one TASK frame.
    """

    ack_wait: float = 30.0
    max_deliveries: int = 5
    backoff: Backoff = field(default_factory=Backoff)
    retry_budget: RetryBudgetConfig = field(default_factory=RetryBudgetConfig)
    per_key_ordering: bool = False
    prefer_other_worker: bool = True
    max_batch: int = 256

    def __post_init__(self) -> None:
        if not self.ack_wait > 0:
            raise ConfigError(f"ack_wait must be > 0, got {self.ack_wait}")
        if self.max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be >= 1, got {self.max_deliveries}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")


@dataclass
class Attempt:
    """One failed delivery in a task's retry history (successful ones are not kept)."""

    delivery: int
    worker: str
    dispatched_at: float  # wall clock, seconds
    ended_at: float
    outcome: str  # "nack" | "timeout" | "worker_gone" | "term" | "unknown"
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-ready mapping."""
        return {
            "delivery": self.delivery,
            "worker": self.worker,
            "dispatched_at": self.dispatched_at,
            "ended_at": self.ended_at,
            "outcome": self.outcome,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "traceback": self.traceback,
        }


@dataclass
class DeadLetter:
    """Effect: write this task to the DLQ (the I/O layer adds the payload)."""

    task_id: int
    key: Hashable | None
    reason: str  # "max_deliveries" | "term"
    deliveries: int
    history: list[Attempt]
    data: Any = None  #: the opaque task data given to add / restore (the payload)


@dataclass
class Effects:
    """What the I/O layer must persist since the last :meth:`Dispatcher.take_effects`."""

    acked: list[int]
    dead: list[DeadLetter]
    failed: list[tuple[int, Attempt]]  # (task id, attempt) for the journal


_GONE = object()  # sentinel: "not a fresh task" (None is a valid task data)
#: Deadline entries below which the deadline queue is never compacted.
_DL_MIN = 4096


class _Task:
    __slots__ = (
        "data", "deadline", "deliveries", "dispatched_at", "history", "id", "key",
        "last_worker", "state", "suspect", "worker",
    )

    def __init__(self, tid: int, key: Hashable | None, deliveries: int, data: Any,
                 worker: bytes | None = None, deadline: float = 0.0,
                 dispatched_at: float = 0.0) -> None:
        # With ``worker``: made in flight (a first delivery), every field set once.
        self.id = tid
        self.key = key
        self.data = data
        self.deliveries = deliveries
        self.state = PENDING if worker is None else INFLIGHT
        self.worker: bytes | None = worker
        self.last_worker: bytes | None = worker
        self.deadline = deadline
        self.dispatched_at = dispatched_at
        self.history: list[Attempt] | None = None
        # Held by a worker that died: it may be the poison that killed it, so its next
        # delivery goes alone to an idle worker (quarantine) and cannot take others down.
        self.suspect = False


class _Flight:
    """Where and when one dispatch pass sent its first deliveries to one worker."""

    __slots__ = ("deadline", "dispatched_at", "worker")

    def __init__(self, worker: bytes, deadline: float, dispatched_at: float) -> None:
        self.worker = worker
        self.deadline = deadline
        self.dispatched_at = dispatched_at


class _Worker:
    __slots__ = ("credit", "ident", "inflight", "isolating", "label", "node_id", "zombies")

    def __init__(self, ident: bytes, node_id: str, label: str, credit: int) -> None:
        self.ident = ident
        self.node_id = node_id
        self.label = label
        self.credit = credit
        self.inflight: set[int] = set()
        # Ids whose delivery timed out on this worker: it may still be busy with them, so they
        # keep counting against its credit until it answers or a second ack_wait passes.
        self.zombies: dict[int, float] = {}
        self.isolating = -1  # id of the suspect task this worker runs alone, or -1

    def free(self) -> int:
        if self.isolating >= 0:
            return 0
        return self.credit - len(self.inflight) - len(self.zombies)

    def release(self, tid: int) -> None:
        self.inflight.discard(tid)
        if self.isolating == tid:
            self.isolating = -1


class Dispatcher:
    """The ack/credit/deadline/redelivery state machine of one queue.

    Args:
        config: the queue's rules.
        now: the monotonic time at creation (seconds).
        rng: randomness for backoff jitter (seed it in tests).
        wall: wall clock for the retry history (``time.time`` by default).
    """

    def __init__(
        self,
        config: DispatchConfig,
        now: float,
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self._wall = wall
        self._budget = RetryBudget(config.retry_budget, now)
        self._tasks: dict[int, _Task] = {}
        # Tasks without a _Task object: never dispatched, or on their first delivery (then
        # also in _flying, which maps them to the shared record of their dispatch pass). A
        # backlog of 200k _Task objects made the cyclic GC walk them all on every full
        # collection, and a _Task per first delivery was the dispatcher's largest cost; the
        # common life (pushed, delivered once, acked) now allocates nothing per task. Any
        # other event (timeout, NACK, TERM, IN_PROGRESS, lost worker, a stray ack) first
        # turns the task into a _Task (_task()), and the general code below handles it.
        self._fresh: dict[int, Any] = {}  # id -> data
        self._fresh_keys: dict[int, Hashable] = {}  # id -> key, for keyed ones only
        self._flying: dict[int, _Flight] = {}
        self._pending: deque[int] = deque()
        self._delayed: list[tuple[float, int, int]] = []  # (due, tid, deliveries)
        # (deadline, [task ids]): one entry per dispatch batch (they share the deadline).
        self._deadlines: deque[tuple[float, list[int]]] = deque()
        # Ids held by _deadlines (acked ones included until their deadline passes), and the
        # size at which tick() drops the ended ones: memory follows the tasks in flight, not
        # the ack rate times ack_wait (168 MiB at 170k tasks/s with ack_wait 30 s before).
        self._dl_ids = 0
        self._dl_limit = _DL_MIN
        self._zombie_q: deque[tuple[float, bytes, int]] = deque()
        self._workers: dict[bytes, _Worker] = {}
        self._key_holder: dict[Hashable, int] = {}
        self._key_wait: dict[Hashable, deque[int]] = {}
        self._high = 0  # 1 + highest task id ever added: ids at or above it were never issued
        self._acked: list[int] = []
        self._dead: list[DeadLetter] = []
        self._failed: list[tuple[int, Attempt]] = []
        self.counters: dict[str, int] = {
            "added": 0, "dispatched": 0, "redelivered": 0, "acked": 0, "nacked": 0,
            "timeouts": 0, "in_progress": 0, "termed": 0, "dead_lettered": 0,
            "forged_acks": 0, "stale_answers": 0, "workers_lost": 0, "tasks_returned": 0,
            "retries_throttled": 0,
        }

    # ------------------------------------------------------------------ tasks in
    def add(self, tid: int, key: Hashable | None = None, data: Any = None) -> None:
        """A new task (just pushed): queue it at the back. ``data`` is opaque (the payload):
        it comes back in dispatches and dead letters."""
        self.restore(tid, key, 0, data=data)

    def add_many(self, items: Iterable[tuple[int, Hashable | None, Any]]) -> None:
        """Many new ``(id, key, data)`` tasks at once."""
        for tid, key, data in items:
            self.add_batch((tid,), key, (data,))

    def add_batch(self, ids: Sequence[int], key: Hashable | None, datas: Sequence[Any]) -> None:
        """New tasks with ids ``ids`` (ascending), one ``key``, and ``datas`` (the push hot
        path: dict and deque updates in C, no Python loop per task)."""
        if not ids:
            return
        self._fresh.update(zip(ids, datas, strict=True))
        if key is not None:
            self._fresh_keys.update(dict.fromkeys(ids, key))
        self._pending.extend(ids)
        if ids[-1] >= self._high:
            self._high = ids[-1] + 1
        self.counters["added"] += len(ids)

    def restore(
        self,
        tid: int,
        key: Hashable | None,
        deliveries: int,
        history: list[Attempt] | None = None,
        *,
        data: Any = None,
    ) -> None:
        """A task recovered after a producer restart with its persisted delivery count.

        A task already delivered ``max_deliveries`` times whose outcome is unknown (the producer
        died before an answer) is dead-lettered now: that is what bounds a poison task that
        kills its worker even across producer restarts.
        """
        t = _Task(tid, key, deliveries, data)
        t.history = list(history) if history else None
        self._tasks[tid] = t
        if tid >= self._high:
            self._high = tid + 1
        self.counters["added"] += 1
        if deliveries >= self.config.max_deliveries:
            self._add_history(t, Attempt(deliveries, "", 0.0, self._wall(), "unknown"))
            self._dead_letter(t, "max_deliveries")
            return
        self._pending.append(tid)

    def mark_high(self, high: int) -> None:
        """Tell the dispatcher ids below ``high`` were issued (acks for them are stale, not
        forged, even when the task is no longer known)."""
        if high > self._high:
            self._high = high

    # ------------------------------------------------------------------ workers
    def worker_ready(self, ident: bytes, credit: int, node_id: str = "", label: str = "") -> None:
        """A worker registered or refreshed its credit (READY)."""
        w = self._workers.get(ident)
        if w is None:
            self._workers[ident] = _Worker(ident, node_id, label or ident.hex(), credit)
        else:
            w.credit = credit

    def is_worker(self, ident: bytes) -> bool:
        """Whether ``ident`` is a registered worker."""
        return ident in self._workers

    def worker_idents(self) -> list[bytes]:
        """Idents of every registered worker."""
        return list(self._workers)

    def workers_of_node(self, node_id: str) -> list[bytes]:
        """Idents of the workers living on node ``node_id``."""
        return [w.ident for w in self._workers.values() if w.node_id == node_id]

    def _task(self, tid: int) -> _Task | None:
        """The _Task of ``tid``, made from its flight record when it is on a first delivery."""
        t = self._tasks.get(tid)
        if t is None and tid in self._flying:
            f = self._flying.pop(tid)
            t = self._tasks[tid] = _Task(tid, self._fresh_keys.pop(tid, None), 1,
                                         self._fresh.pop(tid), f.worker, f.deadline,
                                         f.dispatched_at)
        return t

    def worker_gone(self, ident: bytes, now: float) -> int:
        """The worker is gone (BYE, presence LEFT, its connection ended, a send to it failed):
        its tasks go back to the front of the queue at once. Returns how many tasks were
        returned."""
        w = self._workers.pop(ident, None)
        if w is None:
            return 0
        self.counters["workers_lost"] += 1
        wall = self._wall()
        back: list[int] = []
        for tid in sorted(w.inflight):
            t = self._task(tid)
            if t is None or t.state != INFLIGHT or t.worker != ident:
                continue
            t.worker = None
            self._add_history(t, Attempt(t.deliveries, w.label, t.dispatched_at, wall,
                                         "worker_gone"))
            if t.deliveries >= self.config.max_deliveries:
                self._dead_letter(t, "max_deliveries")
            else:
                t.state = PENDING
                t.suspect = True
                back.append(tid)
        # extendleft reverses: feed it reversed so the oldest ends first in line.
        self._pending.extendleft(reversed(back))
        self.counters["tasks_returned"] += len(back)
        return len(back)

    # ------------------------------------------------------------------ answers
    def on_ack(self, ident: bytes, ids: Iterable[int], now: float) -> int:
        """ACK from ``ident``. Returns how many were accepted; the rest are counted as forged
        (unknown id, unknown worker, never delivered to it) or stale (already ended)."""
        w = self._workers.get(ident)
        tasks = self._tasks
        acked = self._acked
        flying = self._flying
        fresh = self._fresh
        fresh_keys = self._fresh_keys
        ok = 0
        for tid in ids:
            f = flying.get(tid)
            if f is not None and f.worker == ident and w is not None:
                # The common case: the ack of a first delivery, by its worker.
                del flying[tid]
                del fresh[tid]
                if fresh_keys:
                    fresh_keys.pop(tid, None)
                w.inflight.discard(tid)
                acked.append(tid)
                ok += 1
                continue
            t = self._task(tid)
            if t is None:
                if tid < self._high and w is not None and tid not in fresh:
                    # Already ended (a duplicate or late ack): free a zombie slot if it held one.
                    self.counters["stale_answers"] += 1
                    w.zombies.pop(tid, None)
                else:
                    self.counters["forged_acks"] += 1
                continue
            if w is None:
                self.counters["forged_acks"] += 1
                continue
            if t.worker == ident and t.state == INFLIGHT:
                w.inflight.discard(tid)
                if w.isolating == tid:
                    w.isolating = -1
            elif w.zombies.pop(tid, None) is not None:
                # A late ack of a timed-out delivery: the work is done, accept it. If the task
                # was redelivered meanwhile, the other worker keeps the slot until it answers.
                if t.state == INFLIGHT and t.worker is not None:
                    other = self._workers.get(t.worker)
                    if other is not None:
                        other.release(tid)
                        other.zombies[tid] = now + self.config.ack_wait
                        self._zombie_q.append((now + self.config.ack_wait, other.ident, tid))
            else:
                self.counters["forged_acks"] += 1
                continue
            if t.key is None:  # the common case, inlined: no key lock to hand over
                t.state = -1
                t.worker = None
                del tasks[tid]
            else:
                self._finish(t)
            acked.append(tid)
            ok += 1
        self.counters["acked"] += ok
        return ok

    def _answer_target(self, ident: bytes, tid: int) -> tuple[_Worker, _Task] | None:
        """The worker and task of a NACK / TERM / IN_PROGRESS, or None when not current."""
        w = self._workers.get(ident)
        t = self._task(tid)
        if w is None or (t is None and (tid >= self._high or tid in self._fresh)):
            self.counters["forged_acks"] += 1
            return None
        if t is not None and t.worker == ident and t.state == INFLIGHT:
            return w, t
        if w.zombies.pop(tid, None) is not None or t is None:
            self.counters["stale_answers"] += 1
        else:
            self.counters["forged_acks"] += 1
        return None

    def _take_answer(self, ident: bytes, tid: int) -> tuple[_Worker, _Task] | None:
        """A NACK's or TERM's current delivery, taken back from its worker (None: refused)."""
        target = self._answer_target(ident, tid)
        if target is not None:
            w, t = target
            w.release(tid)
            t.worker = None
        return target

    def on_nack(
        self,
        ident: bytes,
        tid: int,
        now: float,
        *,
        delay: float | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
        traceback: str | None = None,
    ) -> bool:
        """NACK: retry later (after ``delay``, or the backoff when None). Returns accepted."""
        target = self._take_answer(ident, tid)
        if target is None:
            return False
        w, t = target
        t.suspect = False  # it failed without killing its worker: not a poison suspect
        self.counters["nacked"] += 1
        att = Attempt(t.deliveries, w.label, t.dispatched_at, self._wall(), "nack",
                      error_type, error_message, traceback)
        self._add_history(t, att)
        self._failed.append((tid, att))
        if delay is None:
            delay = self.config.backoff.delay(t.deliveries, self._rng)
        self._retry(t, delay, now)
        return True

    def on_term(
        self,
        ident: bytes,
        tid: int,
        now: float,
        *,
        reason: str = "",
        error_type: str | None = None,
        error_message: str | None = None,
        traceback: str | None = None,
    ) -> bool:
        """TERM: never retry; dead-letter now with the reason. Returns accepted."""
        target = self._take_answer(ident, tid)
        if target is None:
            return False
        w, t = target
        self.counters["termed"] += 1
        self._add_history(t, Attempt(t.deliveries, w.label, t.dispatched_at, self._wall(),
                                     "term", error_type, error_message or reason, traceback))
        self._dead_letter(t, "term")
        return True

    def on_in_progress(self, ident: bytes, ids: Iterable[int], now: float) -> int:
        """IN_PROGRESS: push the deadlines of these deliveries ``ack_wait`` ahead."""
        n = 0
        for tid in ids:
            target = self._answer_target(ident, tid)
            if target is None:
                continue
            _, t = target
            t.deadline = now + self.config.ack_wait
            # ack_wait is constant, so this deadline is >= every queued one: append keeps order.
            self._deadlines.append((t.deadline, [tid]))
            self._dl_ids += 1
            n += 1
        self.counters["in_progress"] += n
        return n

    # ------------------------------------------------------------------ time
    def tick(self, now: float) -> None:
        """Expire deadlines, release zombie slots, and move due retries back to the queue."""
        if self._dl_ids > self._dl_limit:
            self._compact_deadlines()
        dl = self._deadlines
        tasks = self._tasks
        flying = self._flying
        while dl and dl[0][0] <= now:
            deadline, tids = dl.popleft()
            self._dl_ids -= len(tids)
            for tid in tids:
                f = flying.get(tid)
                if f is not None and f.deadline != deadline:
                    continue  # on its first delivery under a later deadline: not yet
                t = self._task(tid)
                # Answered, redelivered or extended since (its deadline differs): a dead entry.
                if t is not None and t.state == INFLIGHT and t.deadline == deadline:
                    self._timeout(t, now)
        zq = self._zombie_q
        while zq and zq[0][0] <= now:
            _, ident, tid = zq.popleft()
            w = self._workers.get(ident)
            if w is not None:
                rel = w.zombies.get(tid)
                if rel is not None and rel <= now:
                    del w.zombies[tid]
        delayed = self._delayed
        if delayed and delayed[0][0] <= now:
            due: list[int] = []
            while delayed and delayed[0][0] <= now:
                _, tid, n = heapq.heappop(delayed)
                t = tasks.get(tid)
                if t is not None and t.state == DELAYED and t.deliveries == n:
                    t.state = PENDING
                    due.append(tid)
            self._pending.extendleft(reversed(due))

    def _compact_deadlines(self) -> None:
        """Drop the ids of ended deliveries from the deadline queue (amortised O(1): it runs
        when the queue has doubled since the last time)."""
        flying = self._flying
        tasks = self._tasks
        out: deque[tuple[float, list[int]]] = deque()
        n = 0
        for deadline, tids in self._deadlines:
            keep = []
            for tid in tids:
                f = flying.get(tid)
                if f is not None:
                    if f.deadline == deadline:
                        keep.append(tid)
                    continue
                t = tasks.get(tid)
                if t is not None and t.state == INFLIGHT and t.deadline == deadline:
                    keep.append(tid)
            if keep:
                out.append((deadline, keep))
                n += len(keep)
        self._deadlines = out
        self._dl_ids = n
        self._dl_limit = max(_DL_MIN, 2 * n)

    def _timeout(self, t: _Task, now: float) -> None:
        ident = t.worker
        assert ident is not None
        w = self._workers.get(ident)
        label = ident.hex()
        if w is not None:
            label = w.label
            w.release(t.id)
            w.zombies[t.id] = now + self.config.ack_wait
            self._zombie_q.append((now + self.config.ack_wait, ident, t.id))
        t.worker = None
        self.counters["timeouts"] += 1
        att = Attempt(t.deliveries, label, t.dispatched_at, self._wall(), "timeout")
        self._add_history(t, att)
        self._failed.append((t.id, att))
        self._retry(t, 0.0, now)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do (None: nothing scheduled)."""
        cands = []
        if self._deadlines:
            cands.append(self._deadlines[0][0])
        if self._delayed:
            cands.append(self._delayed[0][0])
        if self._zombie_q:
            cands.append(self._zombie_q[0][0])
        return min(cands) if cands else None

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, now: float) -> list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]]:
        """Assign pending tasks to workers with free credit.

        Returns:
            ``[(worker ident, [(task id, delivery number, ack_wait_ms, key, data), ...]), ...]``
            (the TASK frame items, ready to encode). The I/O layer must persist the new
            delivery numbers before it sends them (poison detection).
        """
        pending = self._pending
        if not pending or not self._workers:
            return []
        ready = [w for w in self._workers.values() if w.free() > 0]
        if not ready:
            return []
        free = {w.ident: w.free() for w in ready}
        out: dict[bytes, list[tuple[int, int, int, Any, Any]]] = {}
        sent: list[int] = []
        wait_ms = int(self.config.ack_wait * 1000)
        tasks = self._tasks
        cfg = self.config
        deadline = now + cfg.ack_wait
        wall = self._wall()
        per_key = cfg.per_key_ordering
        prefer_other = cfg.prefer_other_worker and len(ready) > 1
        i = 0
        n_sent = 0
        redelivered = 0
        deferred: list[int] = []
        fresh = self._fresh
        fresh_keys = self._fresh_keys
        flying = self._flying
        flights: dict[bytes, _Flight] = {}
        while pending and ready:
            tid = pending.popleft()
            t = tasks.get(tid)
            if t is None:
                # (a task in flight is never queued: only a _Task goes back to the queue)
                data = fresh.get(tid, _GONE)
                if data is _GONE:
                    continue  # no longer known (acked or dead-lettered): a dead entry
                key = fresh_keys.get(tid) if fresh_keys else None
                if per_key and key is not None:  # ordered: the general path, as a _Task
                    del fresh[tid]
                    del fresh_keys[tid]
                    t = tasks[tid] = _Task(tid, key, 0, data)
            if t is None:
                # The common case: a first delivery with no key order and no quarantine to
                # honour, round robin; no object per task, one flight record per worker.
                if i >= len(ready):
                    i = 0
                w = ready[i]
                ident = w.ident
                flight = flights.get(ident)
                if flight is None:
                    flight = flights[ident] = _Flight(ident, deadline, wall)
                flying[tid] = flight
                deliveries = 1
            else:
                if t.state != PENDING:
                    continue  # acked late or dead-lettered while queued: a dead entry
                key = t.key
                data = t.data
                if per_key and key is not None:
                    holder = self._key_holder.get(key)
                    if holder is None:
                        self._key_holder[key] = tid
                    elif holder != tid:
                        t.state = WAITING_KEY
                        self._key_wait.setdefault(key, deque()).append(tid)
                        continue
                if i >= len(ready):
                    i = 0
                if t.suspect:
                    # Quarantine: only an idle worker, which then takes nothing else meanwhile.
                    idle = [x for x in ready
                            if free[x.ident] == x.credit and x.ident != t.last_worker]
                    if not idle:
                        idle = [x for x in ready if free[x.ident] == x.credit]
                    if not idle:
                        deferred.append(tid)
                        continue
                    w = idle[0]
                    w.isolating = tid
                    free[w.ident] = 1  # this task is its last one for now
                else:
                    w = ready[i]
                    if prefer_other and t.last_worker == w.ident:
                        # Redelivery: try the next worker with credit instead of the failed one.
                        w = ready[(i + 1) % len(ready)]
                ident = w.ident
                t.deliveries += 1
                if t.deliveries > 1:
                    redelivered += 1
                t.state = INFLIGHT
                t.worker = ident
                t.last_worker = ident
                t.deadline = deadline
                t.dispatched_at = wall
                deliveries = t.deliveries
            w.inflight.add(tid)
            sent.append(tid)
            batch = out.get(ident)
            if batch is None:
                batch = out[ident] = []
            batch.append((tid, deliveries, wait_ms, key, data))
            n_sent += 1
            left = free[ident] - 1
            free[ident] = left
            if left <= 0:
                ready.remove(w)
            else:
                i += 1
        if deferred:
            pending.extendleft(reversed(deferred))
        if sent:
            self._deadlines.append((deadline, sent))
            self._dl_ids += len(sent)
        self.counters["dispatched"] += n_sent
        self.counters["redelivered"] += redelivered
        mb = cfg.max_batch
        result: list[tuple[bytes, list[tuple[int, int, int, Any, Any]]]] = []
        for ident, items in out.items():
            for s in range(0, len(items), mb):
                result.append((ident, items[s : s + mb]))
        return result

    # ------------------------------------------------------------------ internals
    def _add_history(self, t: _Task, att: Attempt) -> None:
        if t.history is None:
            t.history = []
        t.history.append(att)

    def _retry(self, t: _Task, delay: float, now: float) -> None:
        if t.deliveries >= self.config.max_deliveries:
            self._dead_letter(t, "max_deliveries")
            return
        extra = self._budget.reserve(now)
        if extra > 0:
            self.counters["retries_throttled"] += 1
        delay = max(0.0, delay) + extra
        if delay <= 0:
            t.state = PENDING
            self._pending.appendleft(t.id)
        else:
            t.state = DELAYED
            heapq.heappush(self._delayed, (now + delay, t.id, t.deliveries))

    def _finish(self, t: _Task) -> None:
        t.state = -1
        t.worker = None
        del self._tasks[t.id]
        if t.key is not None and self._key_holder.get(t.key) == t.id:
            del self._key_holder[t.key]
            waiting = self._key_wait.get(t.key)
            if waiting:
                nxt = waiting.popleft()
                if not waiting:
                    del self._key_wait[t.key]
                nt = self._tasks.get(nxt)
                if nt is not None:
                    nt.state = PENDING
                    self._key_holder[t.key] = nxt
                    self._pending.appendleft(nxt)

    def _dead_letter(self, t: _Task, reason: str) -> None:
        self._finish(t)
        self.counters["dead_lettered"] += 1
        self._dead.append(
            DeadLetter(t.id, t.key, reason, t.deliveries, t.history or [], t.data)
        )

    # ------------------------------------------------------------------ out
    def take_effects(self) -> Effects:
        """Collect (and clear) the acks, dead letters and failures to persist."""
        eff = Effects(self._acked, self._dead, self._failed)
        self._acked = []
        self._dead = []
        self._failed = []
        return eff

    def has_effects(self) -> bool:
        """Whether :meth:`take_effects` would return anything."""
        return bool(self._acked or self._dead or self._failed)

    def stats(self) -> dict[str, int]:
        """Counters plus gauges (pending, in flight, delayed, workers)."""
        out = dict(self.counters)
        inflight = sum(len(w.inflight) for w in self._workers.values())
        unacked = len(self._tasks) + len(self._fresh)
        out["unacked"] = unacked
        out["inflight"] = inflight
        # O(1) gauges (stats are sampled often): the retry heap may hold a few dead entries.
        out["delayed"] = min(len(self._delayed), len(self._tasks) + len(self._flying) - inflight)
        out["pending"] = unacked - inflight - out["delayed"]
        out["workers"] = len(self._workers)
        return out

    def worker_load(self) -> dict[bytes, tuple[int, int]]:
        """``{ident: (in flight + zombies, credit)}`` for every worker."""
        return {
            w.ident: (len(w.inflight) + len(w.zombies), w.credit) for w in self._workers.values()
        }

    def owed(self) -> list[tuple[int, int, list[Attempt]]]:
        """``(id, deliveries, failure history)`` of every task not yet acked nor dead (for a
        journal snapshot), sorted by id."""
        out: list[tuple[int, int, list[Attempt]]] = [
            (tid, 1 if tid in self._flying else 0, []) for tid in self._fresh]
        out.extend((t.id, t.deliveries, list(t.history or ())) for t in self._tasks.values())
        out.sort(key=lambda x: x[0])
        return out

    @property
    def high(self) -> int:
        """1 + the highest task id ever added (ids below it were all handed to the
        dispatcher)."""
        return self._high

    def lowest_owed(self) -> int:
        """The lowest id not yet acked nor dead, or :attr:`high` when none is owed (cheap:
        fresh tasks are kept in id order, and other tasks are the few being retried)."""
        low = self._high
        for tid in self._fresh:  # insertion order is id order: the first is the lowest
            low = tid
            break
        if self._tasks:
            low = min(low, min(self._tasks))
        return low

    def owed_count(self) -> int:
        """How many tasks are not yet acked nor dead (O(1))."""
        return len(self._tasks) + len(self._fresh)

    def unacked_ids(self) -> list[int]:
        """Ids not yet acked nor dead-lettered, sorted."""
        return sorted([*self._tasks, *self._fresh])
