"""Per-(publisher, stream) sequence tracking: in order, duplicate, gap -> replay, buffer.

Pure logic with an injected clock (``now`` arguments, seconds): the subscriber feeds it live
batches, heartbeats, replay chunks and ticks, and it answers with a :class:`Step` saying what
to deliver to the application (contiguous runs), whether to ask the publisher for a replay, and
what was skipped. It never does I/O, so every path is unit-tested without sockets.

Invariants: ``expected`` only grows; every seq is delivered at most once and in order; the
live buffer holds at most ``max_buffer`` events (beyond that live events are dropped and the
replay fetches them again); at most one replay request is outstanding; a reply that moved
nothing (a head that is not really there), or a publisher's ``"busy"``, makes the next request
wait (doubling backoff up to ``retry_s``), so no input can make the tracker ask in a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ReplayAsk", "Step", "StreamTracker", "TrackerStats"]


@dataclass(frozen=True, slots=True)
class ReplayAsk:
    """A replay request the subscriber must send (``start`` or ``from_time`` is set).

    Attributes:
        req: request number; replies carrying another number are stale and ignored.
        start: first seq wanted.
        from_time: resolve the start from this UTC time in ns (start positions by time).
        end: one past the last seq wanted (None: up to the publisher's head).
        epoch: the writer epoch under which everything below ``start`` was seen (None: not
            known yet); the publisher answers from the divergence point when its log no
            longer agrees.
    """

    req: int
    start: int | None
    from_time: int | None
    end: int | None
    epoch: int | None = None


@dataclass(slots=True)
class Step:
    """What to do after feeding the tracker.

    Attributes:
        deliver: contiguous runs ``(first_seq, payloads)`` to hand to the application, in order.
        ask: a replay request to send, or None.
        skipped: a range ``(start, end)`` that will never be delivered, or None.
        skip_reason: why: ``"retention"`` (deleted by the publisher's retention, or
            best-effort loss), ``"damaged"`` (unreadable in the publisher's log) or
            ``"oversize"`` (over this subscriber's ``max_event_size``).
        epoch: the tracker adopted a new writer epoch, before ``skipped`` and ``deliver``:
            ``(epoch, rewind_to, lost)``. ``rewind_to`` is set when the publisher's log no
            longer holds seqs at and after it that this subscriber already delivered (a lost
            tail, a wiped or restored log): delivery goes on from there with new events
            under the same seqs. ``lost`` is ``(start, end, delivered)``: the seqs of the
            old epoch this subscriber saw or knew of that the log no longer has, and how
            many of them it had delivered; None when nothing it knew of was lost. With
            ``lost`` set, ``rewind_to`` is always set (delivery continues there).
    """

    deliver: list[tuple[int, list[bytes]]] = field(default_factory=list)
    ask: ReplayAsk | None = None
    skipped: tuple[int, int] | None = None
    skip_reason: str = "retention"
    epoch: tuple[int, int | None, tuple[int, int, int] | None] | None = None


@dataclass(slots=True)
class TrackerStats:
    """Counters of one tracker (all monotonic)."""

    delivered: int = 0
    duplicates: int = 0
    gaps: int = 0  #: times a hole was detected (live seq above expected, or heartbeat head)
    buffered: int = 0  #: live events held while a hole was being filled
    buffer_dropped: int = 0  #: live events dropped because the buffer was full
    replayed: int = 0  #: events delivered from replay chunks
    replay_requests: int = 0
    replay_retries: int = 0
    replay_deferred: int = 0  #: requests held back by the subscriber's per-publisher limits
    replay_busy: int = 0  #: "busy" refusals from the publisher (its budget for us was full)
    replay_idle: int = 0  #: replies that moved nothing while a head said there was more
    stale_replies: int = 0
    skipped: int = 0  #: seqs that will never be delivered (best-effort loss, retention)
    epochs: int = 0  #: new writer epochs adopted (publisher restarts)
    resets: int = 0  #: epochs that took back seqs this subscriber knew of
    lost: int = 0  #: seqs of an old epoch this subscriber knew of that the log lost


class StreamTracker:
    """Sequence state of one (publisher, stream, epoch).

    Args:
        next_seq: the first seq to deliver; None to resolve it from the first live event or
            heartbeat ("new only"), or from ``from_time`` through a replay.
        replayable: the publisher logs this stream (durable), so holes are replayed; when
            False, holes are skipped and counted.
        max_buffer: the most live events held while a hole is being replayed.
        from_time: start at the first record at or after this UTC time (ns).
        retry_s: re-send an unanswered replay request after this many seconds.
        epoch: the writer epoch ``next_seq`` was reached under (a committed cursor's), or
            None when unknown (a fresh start, or a cursor from an older version).

    Epochs: every publisher incarnation of a durable stream has its own writer epoch. When
    live traffic shows a new one, the tracker holds live events and asks the publisher, with
    the epoch it knows, whether its log still agrees up to ``expected``; the answer says from
    where to read again (see :attr:`Step.epoch`). Nothing of the new epoch is delivered
    before that answer.
    """

    def __init__(self, next_seq: int | None, *, replayable: bool = True,
                 max_buffer: int = 10_000, from_time: int | None = None,
                 retry_s: float = 2.0, epoch: int | None = None) -> None:
        self.expected = next_seq
        self.replayable = replayable
        self.max_buffer = max_buffer
        self.from_time = from_time if next_seq is None else None
        self.retry_s = retry_s
        self.known_head = next_seq or 0
        self.stats = TrackerStats()
        self._buffer: dict[int, bytes] = {}
        self._req = 0
        self._outstanding: ReplayAsk | None = None
        self._sent_at = 0.0
        self._due = 0.0  # when the outstanding request is (re-)sent
        self._unsent = False  # the outstanding request was deferred, never sent
        self._not_before = 0.0  # no new request before this (backoff)
        self._backoff = 0.0
        self.epoch = epoch
        self._pending_epoch: int | None = None  # seen live, not yet confirmed by a reply
        self._old_head = 0  # the head known under self.epoch when a new one appeared

    # --- inputs ------------------------------------------------------------------------------

    def start(self, now: float) -> Step:
        """Called once the publisher is known: ask for the backlog right away when there is one
        to ask for (start from an offset or a time), instead of waiting for a heartbeat."""
        step = Step()
        if not self.replayable:
            return step
        if self.expected is None and self.from_time is not None:
            step.ask = self._ask(now, None, self.from_time, None)
        elif self.expected is not None and self._outstanding is None:
            step.ask = self._ask(now, self.expected, None, None)
        return step

    def on_live(self, first: int, payloads: list[bytes], now: float) -> Step:
        """A DATA batch arrived on the data socket."""
        step = Step()
        end = first + len(payloads)
        if end > self.known_head:
            self.known_head = end
        expected = self.expected
        if self._pending_epoch is not None:
            # A new epoch not yet confirmed: hold it until the publisher said where it starts.
            self._hold(first, payloads)
            return step
        if expected is None:
            if self.from_time is not None:
                # Start not resolved yet (waiting for the time lookup): hold the batch.
                self._hold(first, payloads)
                return step
            self.expected = expected = first  # "new only": the first event seen is the start
        if not self.replayable:
            if first > expected:
                self._skip(step, expected, first)
                self.expected = first
                self._buffer.clear()
            self._absorb(step, first, payloads)
            return step
        if first == expected and not self._buffer:
            # The common case: in order, nothing pending. One run, no per-event work.
            step.deliver.append((first, payloads))
            self.expected = end
            self.stats.delivered += len(payloads)
            return step
        if first > expected:
            self.stats.gaps += 1
        self._absorb(step, first, payloads)
        self._maybe_ask(step, now)
        return step

    def in_order(self, first: int, count: int) -> bool:
        """The fast path of :meth:`on_live`: when a live batch continues ``expected`` with
        nothing held, take it (the caller delivers ``count`` events from ``first`` itself) and
        return True; otherwise change nothing and return False (call :meth:`on_live`).

        Saves building a :class:`Step` per message on the subscriber's hot path.
        """
        if first != self.expected or self._buffer:
            return False
        end = first + count
        if end > self.known_head:
            self.known_head = end
        self.expected = end
        self.stats.delivered += count
        return True

    def on_epoch(self, epoch: int, now: float) -> Step:
        """Live traffic (DATA or HEARTBEAT) carries writer epoch ``epoch``, not ours."""
        step = Step()
        if epoch == self.epoch or epoch == self._pending_epoch or not self.replayable:
            return step
        if self.epoch is None or self.expected is None:
            # Nothing seen under an epoch yet: any lineage agrees with a fresh start.
            self._adopt(step, epoch, None, None)
            return step
        if self._pending_epoch is None:
            self._old_head = self.known_head
        self._pending_epoch = epoch
        self._buffer.clear()  # may hold the old epoch's events beyond a hole
        self._outstanding = None  # a request of the old epoch: ask again, with the check
        step.ask = self._ask(now, self.expected, None, None)
        return step

    def _adopt(self, step: Step, epoch: int, rewind_to: int | None,
               lost: tuple[int, int, int] | None) -> None:
        self.epoch = epoch
        self._pending_epoch = None
        self._old_head = 0
        self.stats.epochs += 1
        if lost is not None:
            self.stats.resets += 1
            self.stats.lost += max(0, lost[1] - lost[0] - lost[2])
        step.epoch = (epoch, rewind_to, lost)

    def on_heartbeat(self, head: int, now: float) -> Step:
        """A HEARTBEAT announced the publisher's head (next seq it will assign)."""
        step = Step()
        if self.expected is None and self.from_time is None:
            self.expected = head  # "new only": nothing before the head
        if head > self.known_head:
            self.known_head = head
        if self.expected is None:
            return step
        if head > self.expected:
            if not self.replayable:
                self._skip(step, self.expected, head)
                self.expected = head
                return step
            if self._outstanding is None:
                self.stats.gaps += 1  # a lost tail: events after the last one we saw
            self._maybe_ask(step, now)
        return step

    def on_replay(self, req: int, first: int, events: list[bytes], head: int, oldest: int,
                  gone: bool, now: float, *, epoch: int = 0, truncate: int | None = None,
                  skip: tuple[int, int, str] | None = None,
                  epoch_end: int | None = None) -> Step:
        """A replay chunk arrived (``first`` = seq of ``events[0]``).

        ``epoch`` is the publisher's writer epoch (0: an older publisher that does not say);
        ``truncate``, ``skip`` and ``epoch_end`` as in
        :class:`patterns.pubsub.frames.ReplayData`.
        """
        step = Step()
        ask = self._outstanding
        if ask is None or ask.req != req or self._unsent:
            self.stats.stale_replies += 1
            return step
        self._outstanding = None
        before = (self.expected, self.epoch)
        if epoch and epoch != self.epoch:
            exp = self.expected
            if self.epoch is None or exp is None:
                self._adopt(step, epoch, None, None)
            else:
                known = max(exp, self._old_head)
                if truncate is not None and truncate < exp:
                    # The log lost seqs we delivered: they come again, as new events.
                    self._adopt(step, epoch, truncate, (truncate, known, exp - truncate))
                    self.expected = truncate
                    self._buffer.clear()
                elif epoch_end is not None and epoch_end < known:
                    # Seqs we knew of (not delivered) were lost with the old epoch.
                    self._adopt(step, epoch, exp, (max(epoch_end, exp), known, 0))
                else:
                    self._adopt(step, epoch, None, None)
            self.known_head = head
        elif epoch:
            self._pending_epoch = None  # the publisher is on our epoch: stale live traffic
        if head > self.known_head:
            self.known_head = head
        if self.expected is None:
            # Start resolved from a time: the publisher says where that time begins.
            self.expected = first
            self.from_time = None
            self._purge_below(first)
        if gone and self.expected < oldest:
            self._skip(step, self.expected, oldest)
            self.expected = oldest
            self._purge_below(oldest)
        if skip is not None and skip[0] <= self.expected < skip[1]:
            self._skip(step, self.expected, skip[1])
            step.skip_reason = skip[2]
            self.expected = skip[1]
            self._purge_below(skip[1])
            self._drain(step)
        if events:
            self.stats.replayed += max(0, first + len(events) - max(first, self.expected))
            self._absorb(step, first, events)
        elif first > self.expected and not gone:
            # The publisher has nothing there (its log restarts higher): nothing more to get.
            self._skip(step, self.expected, first)
            self.expected = first
            self._drain(step)
        if (self.expected, self.epoch) == before and not step.deliver and step.skipped is None:
            # Nothing moved: the publisher has nothing more for us now although a head said
            # so (a head beyond its log, or events not logged yet). Ask again only later.
            self.stats.replay_idle += 1
            self._back_off(now, 0.0)
        else:
            self._backoff = 0.0
            self._not_before = 0.0
        self._maybe_ask(step, now)
        return step

    def on_replay_busy(self, req: int, now: float, retry_after: float) -> None:
        """The publisher refused request ``req`` as ``"busy"`` (over its budget for this
        node, or our connection is backed up): re-send it after ``retry_after`` at least,
        doubling while it stays busy (up to ``retry_s``)."""
        ask = self._outstanding
        if ask is None or ask.req != req or self._unsent:
            self.stats.stale_replies += 1
            return
        self.stats.replay_busy += 1
        self._back_off(now, retry_after)
        self._due = self._not_before

    def defer(self, now: float, delay: float) -> None:
        """The request just asked for was not sent (the subscriber's per-publisher rate or
        outstanding limit): keep it, and send it after ``delay``."""
        if self._outstanding is None:
            return
        if not self._unsent:
            self.stats.replay_requests -= 1
        self._unsent = True
        self.stats.replay_deferred += 1
        self._due = now + delay

    def _back_off(self, now: float, at_least: float) -> None:
        self._backoff = min(self.retry_s, max(at_least, 0.05, self._backoff * 2))
        self._not_before = now + self._backoff

    def on_replay_error(self, req: int) -> None:
        """The publisher could not serve request ``req``; it is retried after ``retry_s``."""
        if self._outstanding is not None and self._outstanding.req == req:
            # Keep it outstanding: on_tick re-sends it after retry_s (bounded retry rate).
            pass

    def on_tick(self, now: float) -> Step:
        """Periodic: re-send an unanswered replay request, or start one that is due."""
        return self._retry(now, force=False)

    def on_peer_restart(self, now: float) -> Step:
        """The publisher came back at a new address: an outstanding request probably went to
        the dead incarnation, so re-send it now instead of after ``retry_s``."""
        return self._retry(now, force=True)

    def _retry(self, now: float, *, force: bool) -> Step:
        step = Step()
        if not self.replayable:
            return step
        ask = self._outstanding
        if ask is not None:
            if force or now >= self._due:
                if not self._unsent:
                    self.stats.replay_retries += 1
                self._outstanding = None
                step.ask = self._ask(now, ask.start if self.expected is None else self.expected,
                                     ask.from_time if self.expected is None else None, ask.end)
            return step
        self._maybe_ask(step, now)
        return step

    # --- views -------------------------------------------------------------------------------

    @property
    def lag(self) -> int:
        """Events known to exist that are not delivered yet."""
        return max(0, self.known_head - (self.expected or 0))

    @property
    def buffered(self) -> int:
        """Live events currently held."""
        return len(self._buffer)

    @property
    def outstanding(self) -> ReplayAsk | None:
        """The replay request waiting for an answer, if any."""
        return self._outstanding

    # --- internals ---------------------------------------------------------------------------

    def _ask(self, now: float, start: int | None, from_time: int | None,
             end: int | None) -> ReplayAsk:
        self._req += 1
        ask = ReplayAsk(self._req, start, from_time, end, self.epoch)
        self._outstanding = ask
        self._sent_at = now
        self._due = now + self.retry_s
        self._unsent = False
        self.stats.replay_requests += 1
        return ask

    def _maybe_ask(self, step: Step, now: float) -> None:
        if (self.replayable and self._outstanding is None and self.expected is not None
                and self.expected < self.known_head and now >= self._not_before):
            step.ask = self._ask(now, self.expected, None, self.known_head)

    def _skip(self, step: Step, start: int, end: int) -> None:
        self.stats.skipped += end - start
        step.skipped = (start, end) if step.skipped is None else (step.skipped[0], end)

    def _hold(self, first: int, payloads: list[bytes]) -> None:
        buf = self._buffer
        for i, p in enumerate(payloads):
            if len(buf) >= self.max_buffer:
                self.stats.buffer_dropped += len(payloads) - i
                return
            if first + i not in buf:
                buf[first + i] = p
                self.stats.buffered += 1

    def _purge_below(self, seq: int) -> None:
        if self._buffer:
            for k in [k for k in self._buffer if k < seq]:
                del self._buffer[k]

    def _absorb(self, step: Step, first: int, payloads: list[bytes]) -> None:
        """Deliver what continues ``expected``, hold what is beyond it, drop duplicates."""
        expected = self.expected
        assert expected is not None
        end = first + len(payloads)
        if end <= expected:
            self.stats.duplicates += len(payloads)
            return
        if first < expected:
            self.stats.duplicates += expected - first
            payloads = payloads[expected - first:]
            first = expected
        if first > expected:
            self._hold(first, payloads)
            return
        buf = self._buffer
        if buf:
            # These seqs may also sit in the buffer (a hole being filled): forget those copies.
            for s in range(first, end):
                buf.pop(s, None)
        step.deliver.append((first, payloads))
        self.stats.delivered += len(payloads)
        self.expected = end
        self._drain(step)

    def _drain(self, step: Step) -> None:
        buf = self._buffer
        if not buf:
            return
        expected = self.expected
        assert expected is not None
        run: list[bytes] = []
        start = expected
        while expected in buf:
            run.append(buf.pop(expected))
            expected += 1
        if run:
            step.deliver.append((start, run))
            self.stats.delivered += len(run)
            self.expected = expected
        if buf and min(buf) < expected:
            self._purge_below(expected)
