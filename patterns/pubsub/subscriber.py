"""The subscribing side: a data ROUTER, one gap tracker per (publisher, stream), replay, cursors.

Data (pub/sub protocol 2): one ROUTER per subscriber makes one connection per publisher it
dialled, each with a routing id *we* chose (``ZMQ_CONNECT_ROUTING_ID``: the publisher's node
id plus a connection number), so every received message names the connection it came on and
a peer cannot forge that. A DATA or HEARTBEAT whose header names another publisher than the
connection's is dropped and counted (``forged_data``): ids and heads are believed only from
the owner's own connection. Each connection asks for the subscriber's topic with a
subscription request (re-sent every :data:`RESUBSCRIBE_S` and whenever the publisher's peer
record changes, so a publisher restarted on the same endpoint hears it again); a refusal is
counted (``subscriptions_refused``) and logged once per publisher and topic.

Threading: the data socket, the trackers and the ready queue belong to the owner thread (the
first thread that receives; any other gets :class:`~mesh.errors.WrongThread`), which polls the
socket holding only ``_pump_lock`` (so :meth:`Subscriber.close` can wait for the poll in
progress); positions and commits are guarded by ``_lock``, which is never held across a
blocking wait, so ``stats()``, ``positions()``, ``commit()`` and ``close()`` from other threads
return at once (``stats()`` reads a lock-free snapshot). Control replies (``pubsub.replay_data``) and peer events arrive on
the node's reactor thread; they are validated there and handed over through a deque plus a
one-byte wake-up on a pipe the iterating thread polls beside the SUB socket: one hand-over per
replay chunk, never one per event.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgpack
import zmq

from mesh import control
from mesh.budget import LogLimiter
from mesh.envelope import DEFAULT_MAX_EVENT_BYTES, Event, decode, from_unpacked
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    EventTooLarge,
    MeshError,
    ProtocolError,
    SignatureInvalid,
    UnsupportedVersion,
    WrongThread,
)
from mesh.peers import PeerEvent, PeerEventKind, PeerInfo, PeerState
from mesh.state import StateStore
from mesh.tracing import consuming, use_event
from patterns._closing import close_with
from patterns._metrics import Processing, attach, subscriber_collector
from patterns.pubsub import _registry, frames
from patterns.pubsub.gaps import ReplayAsk, Step, StreamTracker
from patterns.pubsub.holdings import HOLDINGS_S, board_for

__all__ = ["Batch", "RetentionGap", "Start", "StreamGap", "StreamReset", "Subscriber",
           "SubscriberStats"]

if TYPE_CHECKING:  # the signing module (and cryptography) loads only when used
    from mesh.security.signing import EventVerifier

_log = logging.getLogger("zeromesh.pubsub")

# pyzmq's recv_multipart costs ~6-8 µs per 3-frame message in Python (a sugar recv and a
# getsockopt with enum conversion per frame); the backend recv with int flags, copy=False and
# Frame.more for the message boundary, a fraction of that (see _drain_sub).
_zrecv: Any = zmq.backend.Socket.recv
_NOBLOCK = int(zmq.NOBLOCK)
#: The SUB socket's default RCVHWM in messages (publisher.DATA_HWM: 32 MiB of 32 KiB messages).
_DATA_HWM = 1024
#: Every data connection repeats its subscription request this often (a publisher restarted
#: on the same endpoint, whose peer record did not change, hears it again within this).
RESUBSCRIBE_S = 5.0
_CONN_NO = struct.Struct("!I")
_KIND_HEARTBEAT = frames.KIND_HEARTBEAT  # kinds above it are notices (REFUSED, PING)
_STATIC_PUB = b"\0" * 16  # routing id prefix of a static endpoint's connection
#: One pump decodes at most about this many bytes of DATA (one full message of the
#: publisher's 32 KiB, some 140 events of 100 B, and at least one message) into the ready
#: queue however much is queued: what a stuck or slow handler holds decoded stays small. It
#: was 256 KiB; 32 KiB costs 0.3-0.5 µs less CPU per delivered 100 B event
#: (bench/bench_sub_cpu.py, BENCHMARKS.md): fewer decoded events wait in the queue, so fewer
#: live objects are there when the cyclic GC runs (each event is a GC-tracked object).
_PUMP_BYTES = 32 << 10

Key = tuple[str, str]  # (publisher node id, stream)

#: Default clock-skew allowance of :meth:`Start.new` for streams first seen after the
#: subscriber started (see ``Subscriber(new_stream_skew_s=...)``).
NEW_STREAM_SKEW_S = 0.5
#: Replay requests per second, and unanswered ones, per publisher (Subscriber defaults).
REPLAY_RATE = 200.0
REPLAY_OUTSTANDING = 16
#: Publishers whose latest replay token the node remembers (_SubRouter.last_tok).
_MAX_TOK_PEERS = 4096


#: One item of the ready queue: a run ``(key, first seq, [events...])`` (never empty; its
#: events have seqs ``first, first + 1, ...``) or a mark ``(key, seq, _Mark)`` (a gap, a
#: skipped or refused event, an epoch change), applied when iteration reaches it. One item
#: per decoded run, not per event: no per-event tuple to build, queue, pop or collect.
ReadyItem = tuple[Key, int, "list[Event] | _Mark"]
#: A span of a Batch: ``count`` events of ``key`` from seq ``first`` on.
Span = tuple[Key, int, int]


#: A consumer that handled events and then waited this long with nothing arriving commits them
#: (and acks them to their publishers) without waiting for the commit interval.
_QUIET_MS = 20

class Batch(list[Event]):
    """The events of one :meth:`Subscriber.recv_batch` call (a plain list of events).

    Commit means handled: iterating the batch marks event ``i - 1`` processed when event ``i``
    is taken, and the last one when the iteration ends, as the subscriber's own iterator does.
    A batch that was not iterated (indexed, sliced, handed to a bulk call) counts as processed
    as a whole when the next ``recv``/``recv_batch``/``commit`` call is made. Leaving the
    ``with Subscriber(...)`` block (or :meth:`Subscriber.run`) by an exception commits nothing
    past the last event the iteration fully passed: after a restart a durable subscription
    resumes at the event that failed.
    """

    _spans: list[Span] = []  # (key, first seq, count) of its events, in order
    _n = 0  # events it was handed out with (the list itself belongs to the caller)
    _it: Any = None  # the list iterator of the last iteration (None: never iterated)
    _settled = 0  # events whose positions were applied already

    def __iter__(self) -> Iterator[Event]:
        # The plain C list iterator: no per-event Python work. How far it got is read back
        # only when needed (once per batch), from its pickling state: ``(iter, (list,), i)``
        # while it can still yield (``i`` = events taken so far), ``(iter, ([],))`` once it
        # ran out, i.e. after the loop body of the last event finished.
        it = list.__iter__(self)
        self._it = it
        return it

    def _taken(self) -> int:
        """Events the last iteration took; -1 when it ran to its end (all passed)."""
        red = self._it.__reduce__()
        return int(red[2]) if len(red) > 2 else -1

    @property
    def _passed(self) -> int:
        """Events the iteration fully passed (the one it is on is not)."""
        if self._it is None:
            return 0
        taken = self._taken()
        return self._n if taken < 0 else max(0, taken - 1)

    @property
    def _handed(self) -> int:
        """Events handed out: all when not iterated, else those taken so far."""
        if self._it is None:
            return self._n
        taken = self._taken()
        return self._n if taken < 0 else min(taken, self._n)

    def _settle(self, positions: dict[Key, int], n: int) -> None:
        """Move ``positions`` past the first ``n`` events (under the subscriber's lock);
        never back over events settled before."""
        done = self._settled
        if n <= done:
            return
        at = 0  # events before the span
        for key, first, cnt in self._spans:  # one step per span (a decoded run), not per event
            end = at + cnt
            if end > done:
                positions[key] = first + (min(n, end) - at)
            at = end
            if at >= n:
                break
        self._settled = n


class StreamGap(MeshError):
    """Seqs of a stream that will never be delivered: a typed, counted gap, never silence.

    Raised from iteration (in order: every event before it was handed out first) when the
    subscriber was made with ``on_gap="error"``; iterating again continues after it. With
    ``on_gap="skip"`` (default) it is counted in :class:`SubscriberStats`, logged, and kept in
    :meth:`Subscriber.gaps`. The committed position moves past it only when it is reached.

    Attributes:
        publisher: the publisher's node id.
        stream: the stream.
        start: first seq lost.
        end: one past the last seq lost.
        reason: ``"retention"`` (deleted by the publisher's retention), ``"damaged"``
            (unreadable in the publisher's log), ``"oversize"`` (larger than this
            subscriber's ``max_event_size``), ``"undecodable"`` (not an envelope this build
            reads, e.g. a future major version) or ``"lost"`` (:class:`StreamReset`).
    """

    def __init__(self, publisher: str, stream: str, start: int, end: int,
                 reason: str = "retention", message: str | None = None) -> None:
        why = {"retention": "were deleted by the publisher's retention",
               "damaged": "are unreadable in the publisher's log",
               "oversize": "are larger than this subscriber's max_event_size",
               "undecodable": "could not be decoded"}.get(reason, f"were lost ({reason})")
        super().__init__(message or f"events {start}..{end - 1} of stream {stream!r} from "
                         f"{publisher} {why}")
        self.publisher = publisher
        self.stream = stream
        self.start = start
        self.end = end
        self.reason = reason


class RetentionGap(StreamGap):
    """Events a subscriber asked for were deleted by the publisher's retention (a
    :class:`StreamGap` with reason ``"retention"``; raised with ``on_retention="error"``)."""

    def __init__(self, publisher: str, stream: str, start: int, end: int) -> None:
        super().__init__(publisher, stream, start, end, "retention")


class StreamReset(StreamGap):
    """The publisher's log lost seqs this subscriber saw or knew of: a new writer epoch.

    A power cut that took the publisher's unsynced tail, a deleted last segment, a wiped
    stream directory or a data dir restored from an older backup: the publisher now assigns
    seqs from ``resume_at`` again, to new events. The subscriber re-reads from ``resume_at``
    (the new events come next, with those seqs); ``start..end-1`` are the old epoch's seqs it
    saw or knew of that no longer exist, ``delivered`` of them were handed out before.

    Attributes:
        epoch: the publisher's new writer epoch.
        resume_at: the seq delivery continues at (new events).
        delivered: how many of the lost seqs this subscriber had already handed out.
    """

    def __init__(self, publisher: str, stream: str, start: int, end: int, *, epoch: int,
                 resume_at: int, delivered: int) -> None:
        super().__init__(publisher, stream, start, end, "lost",
                         f"the log of stream {stream!r} on {publisher} lost seqs "
                         f"{start}..{end - 1} (a new writer epoch {epoch}; {delivered} of "
                         f"them were delivered here): delivery continues at {resume_at} "
                         "with new events")
        self.epoch = epoch
        self.resume_at = resume_at
        self.delivered = delivered


class _Mark:
    """A ready-queue item that is not an event: applied in order when iteration reaches it.

    ``pos`` is the position it sets (None: unchanged), ``epoch`` the writer epoch positions
    are under from then on (None: unchanged), ``gap`` the notice it records (and raises to
    the application when ``raise_it``).
    """

    __slots__ = ("epoch", "gap", "pos", "raise_it")

    def __init__(self, pos: int | None, epoch: int | None, gap: StreamGap | None,
                 raise_it: bool = False) -> None:
        self.pos = pos
        self.epoch = epoch
        self.gap = gap
        self.raise_it = raise_it


@dataclass(frozen=True)
class Start:
    """Where a subscription starts on each (publisher, stream) it finds.

    Build one with :meth:`beginning`, :meth:`offset`, :meth:`time` or :meth:`new`. A durable
    subscription with a committed cursor resumes from the cursor instead.
    """

    kind: Literal["beginning", "offset", "time", "new"]
    value: int = 0

    @classmethod
    def beginning(cls) -> Start:
        """From the oldest event the publisher still holds."""
        return cls("beginning", 0)

    @classmethod
    def offset(cls, seq: int) -> Start:
        """From seq ``seq`` of every matching stream.

        Raises:
            ConfigError: ``seq`` is negative.
        """
        if seq < 0:
            raise ConfigError(f"start offset must be >= 0, got {seq}")
        return cls("offset", seq)

    @classmethod
    def time(cls, when: datetime | int) -> Start:
        """From the first event stored at or after ``when`` (aware datetime or UTC ns).

        Raises:
            ConfigError: a naive datetime.
        """
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ConfigError("Start.time needs a timezone-aware datetime")
            return cls("time", int(when.timestamp() * 1_000_000) * 1000)
        return cls("time", int(when))

    @classmethod
    def new(cls) -> Start:
        """Only events published after the subscriber started.

        A stream already offered when the subscriber is made starts at its head (the first
        event or heartbeat seen). A durable stream first seen later (its publisher joined,
        or began offering it, after the subscriber started) starts at the first event its
        publisher logged at or after the subscriber's start time minus
        ``Subscriber(new_stream_skew_s=...)``: nothing published after the subscriber started
        is missed, within that clock-skew allowance. A best-effort stream starts at the first
        event seen.
        """
        return cls("new", 0)


@dataclass
class SubscriberStats:
    """A snapshot of a subscriber's counters (tracker counters summed over its streams)."""

    messages: int = 0
    heartbeats: int = 0
    delivered: int = 0
    duplicates: int = 0
    gaps: int = 0
    buffered: int = 0
    buffer_dropped: int = 0
    replayed: int = 0
    replay_requests: int = 0
    replay_retries: int = 0
    replay_chunks: int = 0
    replay_errors: int = 0
    replay_deferred: int = 0
    replay_busy: int = 0
    replay_idle: int = 0
    skipped: int = 0
    bad_frames: int = 0
    bad_version: int = 0
    oversize: int = 0
    bad_events: int = 0
    bad_replies: int = 0
    lag: int = 0
    commits: int = 0
    bytes_in: int = 0
    streams: int = 0
    forbidden: int = 0
    bad_signatures: int = 0
    gap_notices: int = 0
    epochs: int = 0
    resets: int = 0
    lost: int = 0
    forged_data: int = 0
    subscriptions_refused: int = 0
    old_publishers: int = 0
    #: data connections to a publisher that refused the packed layout (pub/sub 2.3 and
    #: earlier): asked again for one frame per envelope
    unpacked_publishers: int = 0
    #: DATA messages received in the packed layout (pub/sub 2.4)
    packed_messages: int = 0


class _DataConn:
    """One connection of the data ROUTER to one publisher's data endpoint (owner thread).

    ``pub`` is the node id the connection was made to (None for a static endpoint until its
    first valid message names one, which is then pinned: trust on first use, documented).
    """

    __slots__ = ("endpoint", "packed", "pub", "rid", "static")

    def __init__(self, rid: bytes, endpoint: str, pub: str | None, static: bool) -> None:
        self.rid = rid
        self.endpoint = endpoint
        self.pub = pub
        self.static = static
        # Ask for packed DATA (pub/sub 2.4) until the publisher refuses the flag (2.3).
        self.packed = True


def _cursor_value(v: object) -> tuple[int, int | None] | None:
    """A stored cursor: ``[position, epoch]`` (epoch None: unknown), or a bare position from
    a version without epochs; None when it is neither."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v, None
    if isinstance(v, list | tuple) and len(v) == 2 and isinstance(v[0], int) and v[0] >= 0 \
            and (v[1] is None or isinstance(v[1], int)):
        return v[0], v[1]
    return None


def _resolve_verifier(node: Any, verify: bool | EventVerifier | None) -> EventVerifier | None:
    if verify is not None and not isinstance(verify, bool):
        from mesh.security.signing import EventVerifier

        if isinstance(verify, EventVerifier):
            return verify
    if verify is False:
        return None
    sec = getattr(node, "security", None)
    if sec is None:
        if verify:
            raise ConfigError("verify=True needs a node with security (SecurityConfig."
                              "event_keys) or an EventVerifier")
        return None
    if verify or sec.config.event_keys:
        return sec.verifier  # type: ignore[no-any-return]
    return None


class _SubRouter:
    """Per node: routes ``pubsub.replay_data`` replies to the subscriber that asked."""

    def __init__(self, node: Any) -> None:
        self.subs: dict[str, Subscriber] = {}
        self.bad = 0
        #: publisher node id -> the ``tok`` of the latest reply read from it (echoed in the
        #: next request: it returns the bytes sent to us to the publisher's budget for us).
        self.last_tok: dict[str, int] = {}
        #: every line a remote peer's replies can trigger goes through it (per node)
        self.logs = LogLimiter(_log)
        node.handle(frames.CTRL_REPLAY_DATA, self._on_data)

    def _on_data(self, peer_id: str, body: object) -> None:
        tok = body.get("tok") if isinstance(body, dict) else None
        if isinstance(tok, int) and not isinstance(tok, bool) and 0 <= tok < 1 << 63 and (
                peer_id in self.last_tok or len(self.last_tok) < _MAX_TOK_PEERS):
            self.last_tok[peer_id] = tok
        sid = body.get("sid") if isinstance(body, dict) else None
        sub = self.subs.get(sid) if isinstance(sid, str) else None
        if sub is None:
            self.bad += 1
            self.logs.warning(f"nosub:{peer_id}", "pubsub: replay data from %s for no "
                              "subscriber", peer_id)
            return
        try:
            data = frames.decode_replay_data(body, max_event_size=sub.max_event_size)
        except (ProtocolError, CodecError) as exc:
            sub._count_bad_reply(exc)
            self.logs.warning(f"bad:{peer_id}", "pubsub: bad replay data from %s: %s",
                              peer_id, exc)
            return
        sub._post(("replay", peer_id, data))


class Subscriber:
    """Receives the events of every stream matching ``topic``, in order, exactly once each.

    ``topic`` is an exact stream name, or a prefix when it ends with ``"."`` or ``"*"``
    (``"sensors."`` / ``"sensors*"`` match ``"sensors.temp"``). The subscriber connects to every
    peer offering a matching stream (now and as they appear) and to ``endpoints``.

    Examples::

        with Subscriber(node, "sensors.", start=Start.beginning(), durable="agg") as sub:
            for event in sub:
                handle(event)          # the cursor moves past it when the next one is asked

        sub.run(handle)                # callback style: commit after handle() returns

    Delivery: per (publisher, stream) in seq order, no duplicate, no hole (holes are replayed
    from the publisher's log; only best-effort streams and retention can lose events, and both
    are counted). Across restarts of a durable subscription delivery is at least once: events
    after the last commit come again (use :class:`~patterns.pubsub.dedup.Dedup`).

    Args:
        node: the started node.
        topic: stream name or prefix.
        start: where to start on a stream without a committed cursor (default: beginning for a
            durable subscription, new otherwise).
        durable: the name of a durable subscription: its cursor per (publisher, stream) lives
            in ``<data_dir>/pubsub-cursors.db`` and survives restarts.
        auto_commit: commit the cursor every ``commit_interval_s`` and at close; else only on
            :meth:`commit`.
        commit_interval_s: how often auto commit writes (and acks the position to publishers);
            a stream that goes quiet (the consumer handled events and waited 20 ms with nothing
            new) is also committed then, at most once per quarter interval.
        endpoints: static data endpoints of publishers (``tcp://...`` / ``ipc://...``; the
            publishers' data ROUTERs, pub/sub protocol 2). Each connection is bound to the
            first publisher id a valid message on it names (trust on first use): messages
            naming another are dropped and counted (``forged_data``).
        on_retention: ``"skip"`` (count and go on at the oldest kept event) or ``"error"``
            (raise :class:`RetentionGap` from the iteration, then go on).
        on_gap: what every other gap does (:class:`StreamGap`: damaged in the publisher's
            log, oversize, undecodable, and :class:`StreamReset` when the publisher's log lost
            seqs): ``"skip"`` counts, logs and records it (:meth:`gaps`), ``"error"`` raises it
            from the iteration in order, then goes on. Default: as ``on_retention``.
        rcvhwm: the data socket's receive high-water mark in messages per publisher
            connection (default 1024: 32 MiB of the publishers' messages of up to 32 KiB).
        max_buffer: live events held per stream while a hole is replayed.
        replay_chunk: events per replay reply.
        max_event_size: larger envelopes are counted and dropped.
        retry_s: re-send an unanswered replay request after this long.
        replay_rate: the most replay requests per second sent to one publisher (a token
            bucket with a burst of as many); more are held back and sent later, counted in
            ``SubscriberStats.replay_deferred``.
        replay_outstanding: the most replay requests waiting for an answer from one
            publisher (over all its streams); more are held back the same way.
        verify: end-to-end signature check of every delivered event, live or replayed
            (mesh.security.signing): ``True`` with the node's verifier (the keys of
            ``SecurityConfig.event_keys``, plus the node's own signing key), an
            :class:`~mesh.security.signing.EventVerifier` with its keys, ``False`` never,
            ``None`` (default) exactly when the node's ``SecurityConfig.event_keys`` is not
            empty. An event that fails (unsigned, unknown key, altered) is not delivered: it
            is counted (``SubscriberStats.bad_signatures``), logged, and the stream moves on
            past it in order (it is never retried; the cursor passes it once every event before
            it was processed).
        new_stream_skew_s: with :meth:`Start.new`, a durable stream first seen after the
            subscriber started (its publisher joined later, or began offering it later) starts
            at the first event its publisher logged at or after the subscriber's start time
            minus this allowance, so no event published after the subscriber started is
            missed. Timestamps are the publisher's wall clock: a publisher whose clock is
            behind ours by more than this may lose its first events; one ahead (or this
            allowance) may add events published up to this long before we subscribed.
            Streams already offered when the subscriber is made start at their head.
        forget_after_s: a publisher that left the mesh (``PeerEventKind.LEFT``) and did not
            come back for this long is forgotten: its trackers are dropped and its data
            endpoint disconnected (it is found again if it returns).
        forget_cursors_after_s: the positions of a publisher gone this long (a durable
            subscription's cursor rows: wall clock, counted across restarts) are deleted;
            until then a returning publisher resumes at them. :meth:`forget` deletes them at
            once. A publisher that returns after that starts as a new one (per ``start``).

    Threading: one owner thread receives (``recv``, ``recv_batch``, iteration, ``run``): the
    first thread that does; any other thread gets :class:`~mesh.errors.WrongThread`.
    ``close()``, ``stats()``, ``positions()``, ``commit()`` and ``forget()`` may be called
    from any thread and never wait on a receive in progress for longer than one socket poll
    slice (``stats()`` and ``positions()`` not at all). ``commit()`` from another thread
    commits what the owner has finished, never the event it is handling.

    Raises:
        ConfigError: bad arguments (``verify=True`` on a node without security).
        StateError: the cursor store cannot be opened.
    """

    def __init__(self, node: Any, topic: str, *, start: Start | None = None,
                 durable: str | None = None, auto_commit: bool = True,
                 commit_interval_s: float = 1.0, endpoints: tuple[str, ...] | list[str] = (),
                 on_retention: Literal["skip", "error"] = "skip", rcvhwm: int | None = None,
                 max_buffer: int = 10_000, replay_chunk: int = 2000,
                 max_event_size: int = DEFAULT_MAX_EVENT_BYTES, retry_s: float = 2.0,
                 replay_rate: float = REPLAY_RATE, replay_outstanding: int = REPLAY_OUTSTANDING,
                 verify: bool | EventVerifier | None = None,
                 new_stream_skew_s: float = NEW_STREAM_SKEW_S,
                 forget_after_s: float = 24 * 3600.0,
                 forget_cursors_after_s: float = 30 * 24 * 3600.0,
                 on_gap: Literal["skip", "error"] | None = None) -> None:
        if not topic:
            raise ConfigError("topic must not be empty")
        if on_retention not in ("skip", "error"):
            raise ConfigError(f"on_retention must be 'skip' or 'error', got {on_retention!r}")
        if replay_chunk <= 0 or max_buffer < 0:
            raise ConfigError("replay_chunk must be > 0 and max_buffer >= 0")
        if replay_rate <= 0 or replay_outstanding < 1:
            raise ConfigError("replay_rate must be > 0 and replay_outstanding >= 1")
        if new_stream_skew_s < 0 or forget_after_s < 0 or forget_cursors_after_s < 0:
            raise ConfigError("new_stream_skew_s, forget_after_s and forget_cursors_after_s "
                              "must be >= 0")
        self.node = node
        self.topic = topic
        self.prefix = topic.endswith((".", "*"))
        self._match = topic.rstrip("*") if self.prefix else topic
        self.start = start or (Start.beginning() if durable else Start.new())
        self.durable = durable
        self.auto_commit = auto_commit
        self.commit_interval_s = commit_interval_s
        self.on_retention = on_retention
        if on_gap not in (None, "skip", "error"):
            raise ConfigError(f"on_gap must be 'skip' or 'error', got {on_gap!r}")
        self.on_gap = on_gap or on_retention
        self._gaps: collections.deque[StreamGap] = collections.deque(maxlen=100)
        self.max_buffer = max_buffer
        self.replay_chunk = replay_chunk
        self.replay_bytes = min(1 << 20, max(64 << 10, node.config.max_message_bytes // 4))
        self.max_event_size = max_event_size
        self.retry_s = retry_s
        self.replay_rate = replay_rate
        self.replay_outstanding = replay_outstanding
        # Per publisher (owner thread): [tokens, last refill] and {stream key: sent at} of
        # the requests waiting for an answer. Bounded by the publishers we track.
        self._replay_bucket: dict[str, list[float]] = {}
        self._replay_inflight: dict[str, dict[Key, float]] = {}
        self._verifier = _resolve_verifier(node, verify)
        self.sid = uuid.uuid4().hex
        self._stats = SubscriberStats()
        self._lock = threading.RLock()  # positions, commits; never held across a wait
        self._pump_lock = threading.Lock()  # held by the owner across one poll slice
        self._owner: int | None = None
        self._closed = False
        self.new_stream_skew_s = new_stream_skew_s
        self.forget_after_s = forget_after_s
        self.forget_cursors_after_s = forget_cursors_after_s
        self._started_ns = time.time_ns()
        self._constructing = True  # streams found now start at their head (Start.new)
        self._self_info: PeerInfo | None = None
        self._left: dict[str, float] = {}  # publisher -> monotonic time it left
        #: data endpoint -> a publisher announcing it while another still held it (bounded
        #: by the endpoints we are connected to)
        self._clashes: dict[str, str] = {}
        self._gone: dict[str, int] = {}  # publisher -> wall ns since its cursors are orphaned
        self._gone_ns = f"pubsub.gone.{durable}" if durable else ""
        self._trackers: dict[Key, tuple[int, StreamTracker]] = {}
        self._ready: collections.deque[ReadyItem] = collections.deque()
        self._off = 0  # events of the run at the head of _ready already handed out
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._positions: dict[Key, int] = {}
        # The writer epoch each position was reached under (None: unknown, older cursor);
        # committed with it, so a restart can ask the publisher whether its log still agrees.
        self._pos_epoch: dict[Key, int | None] = {}
        self._committed: dict[Key, tuple[int, int | None]] = {}
        # Handed out and not yet known to be processed: the event of the last recv(), or the
        # last recv_batch() (see Batch). Nothing else is ever outstanding.
        self._cur: tuple[Key, int, Event] | None = None
        self._batch: Batch | None = None
        self._conns: dict[bytes, _DataConn] = {}  # routing id -> connection
        self._by_ep: dict[str, _DataConn] = {}
        self._conn_no = 0
        self._next_resub = time.monotonic() + RESUBSCRIBE_S
        self._refusals_seen: set[tuple[str, str]] = set()  # said once each (bounded)
        self._logs = LogLimiter(_log)
        self._sub_frames = frames.encode_subscribe(
            self._match.encode(), prefix=self.prefix, packed=True)
        self._sub_frames_old = frames.encode_subscribe(self._match.encode(), prefix=self.prefix)
        self._static = set(endpoints)
        self._peer_eps: dict[str, str] = {}  # publisher node id -> the data endpoint we use
        self._peer_keys: dict[str, str | None] = {}  # ... and the CURVE key it was dialled with
        self._next_tick = 0.0
        self._next_commit = time.monotonic() + commit_interval_s
        self._last_commit = 0.0
        self._moves = 0  # positions moved by the consumer (under _lock)
        self._moves_at_commit = 0  # ... at the last auto commit
        self._store: StateStore | None = None
        self._cursor_ns = f"pubsub.cursor.{durable}" if durable else ""
        if durable:
            self._store = StateStore(Path(node.data_dir) / "pubsub-cursors.db")
            for k, v in self._store.items(self._cursor_ns):
                pub, _, stream = k.partition("/")
                cur = _cursor_value(v)
                if cur is not None and stream:
                    self._committed[(pub, stream)] = cur
                    self._positions[(pub, stream)] = cur[0]
                    self._pos_epoch[(pub, stream)] = cur[1]
            self._load_gone()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        sock = node.socket(zmq.ROUTER, "sub")
        # Bounded in bytes: publishers cut DATA messages at 32 KiB, so 1024 of them queue at
        # most 32 MiB (publisher.DATA_HWM) per connection; beyond that the publisher drops
        # and we replay.
        sock.setsockopt(zmq.RCVHWM, rcvhwm if rcvhwm is not None else _DATA_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._rfd, zmq.POLLIN)
        self._router = _registry.get_or_create(node, "pubsub.sub", lambda: _SubRouter(node))
        self._router.subs[self.sid] = self
        # Replicated streams (patterns/pubsub/store.py): who holds copies of which origin
        # streams, the live stores, and per stream the origin's oldest seq when it said
        # "gone" for a range a store still holds (asked of the store from then on).
        self._board = board_for(node)
        self._live_stores: set[str] = set()
        self._origin_floor: dict[Key, int] = {}
        # Streams whose origin left a request unanswered for retry_s (until it answers one),
        # and the tracker's retry count when we last sent (a retry shows there).
        self._origin_mute: set[Key] = set()
        self._retries_seen: dict[Key, int] = {}
        self._next_holdings = 0.0
        self._holdings_since: float | None = None  # when we first asked the stores
        for ep in endpoints:
            self._connect(ep)
        self._unsubscribe_peers: Callable[[], None] = node.on_peer(self._on_peer_event)
        self._processing = Processing(node, "pubsub", topic)
        self._unmetrics = attach(node, subscriber_collector(self))
        self._unclose = close_with(node, self.close)  # node.close() closes it first
        with self._lock:
            for peer in self._offering_peers():
                self._add_peer(peer)
            self._add_self()
        self._constructing = False

    # --- cross-thread hand-over ------------------------------------------------------------

    def _post(self, item: tuple[Any, ...]) -> None:
        """Called on the reactor thread: queue ``item`` and wake the iterating thread."""
        if self._closed:
            return
        self._inbox.append(item)
        try:
            os.write(self._wfd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already awake) or closed

    def _on_peer_event(self, ev: PeerEvent) -> None:
        if ev.kind is PeerEventKind.LEFT:
            # Single dict operations: atomic under the GIL, read by the owner's tick.
            if ev.peer.node_id in self._peer_eps:
                self._left[ev.peer.node_id] = time.monotonic()
            return
        if ev.kind in (PeerEventKind.JOINED, PeerEventKind.CHANGED):
            self._left.pop(ev.peer.node_id, None)
        if ev.kind in (PeerEventKind.JOINED, PeerEventKind.CHANGED) and self._offers_match(
                ev.peer):
            self._post(("peer", ev.peer))
            self._reack(ev.peer.node_id)

    def _reack(self, pub: str) -> None:
        """Tell a (re)joining publisher our committed positions of its streams.

        Acks are otherwise sent only when a position changes, so a publisher restarted on the
        same log would never learn where a caught-up durable subscriber stands (its lag and
        retention floor would stay unknown until new events flow). Runs on the reactor thread:
        ``list(dict.items())`` is one C call, so the snapshot is consistent without our lock.
        """
        if self._store is None:
            return
        for (p, stream), (pos, _epoch) in list(self._committed.items()):
            if p == pub:
                try:
                    self.node.send(pub, frames.CTRL_ACK,
                                   frames.Ack(self.durable or "", stream, pos).to_body())
                except MeshError:
                    pass  # not reachable yet: the next join or commit tells it

    def _count_bad_reply(self, exc: Exception) -> None:
        self._stats.bad_replies += 1
        if isinstance(exc, UnsupportedVersion):
            self._stats.bad_version += 1
        elif isinstance(exc, EventTooLarge):
            self._stats.oversize += 1

    # --- peers -----------------------------------------------------------------------------

    def _offers_match(self, peer: PeerInfo) -> bool:
        return any(self._matches(s) for s in peer.offers.get("stream", ()))

    def _matches(self, stream: str) -> bool:
        return stream.startswith(self._match) if self.prefix else stream == self._match

    def _offering_peers(self) -> list[PeerInfo]:
        if self.prefix:
            return self.node.who_offers("stream", prefix=self._match)  # type: ignore[no-any-return]
        return self.node.who_offers("stream", name=self._match)  # type: ignore[no-any-return]

    def _connect(self, endpoint: str, pub: str | None = None) -> None:
        """Connect the data ROUTER to ``endpoint`` (the data endpoint of node ``pub``; None:
        a static endpoint) under a routing id of our own, and ask for our topic there."""
        conn = self._by_ep.get(endpoint)
        if conn is not None:
            if pub is not None and conn.pub is None:
                conn.pub = pub  # a static endpoint turns out to be this peer's
            elif pub is not None and conn.pub != pub:
                self._logs.warning(f"clash:{endpoint}", "pubsub: %s is %s's data endpoint "
                                   "but answers as %s; not used for %s", endpoint, pub,
                                   conn.pub, pub)
                self._clashes[endpoint] = pub
                return
            self._subscribe(conn)
            return
        self._conn_no += 1
        rid = (frames.node_id_bytes(pub) if pub is not None else _STATIC_PUB) \
            + _CONN_NO.pack(self._conn_no & 0xFFFFFFFF)
        try:
            # A routing id libzmq must never have seen on this socket (a duplicate aborts).
            self._sock.setsockopt(zmq.CONNECT_ROUTING_ID, rid)
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {endpoint!r}: {exc}") from exc
        conn = _DataConn(rid, endpoint, pub, pub is None)
        self._conns[rid] = conn
        self._by_ep[endpoint] = conn
        self._subscribe(conn)

    def _holds(self, pub: str | None, endpoint: str) -> bool:
        """Does publisher ``pub`` still hold ``endpoint``: joined and announcing it?"""
        if pub is None:
            return True  # a static endpoint's first answer: trust on first use
        info = self.node.peers.get(pub)
        return (info is not None and self.node.peers.state(pub) is PeerState.JOINED
                and endpoint in info.endpoints.get(frames.DATA_ROLE, ()))

    def _take_over(self, conn: _DataConn, pub: str) -> None:
        """Plaintext: ``conn`` (bound to another publisher) carries ``pub``'s data, ``pub``
        announces its endpoint, and the publisher it was bound to no longer does (killed, and
        its port now bound by ``pub``, which shares its data-port range). The endpoint is
        ``pub``'s: a new connection for it. Under CURVE a connection made with the old
        owner's key never carries another node's data, so this never happens there."""
        endpoint = conn.endpoint
        info = self.node.peers.get(pub)
        if (self._clashes.get(endpoint) != pub or info is None or self._holds(conn.pub, endpoint)
                or endpoint not in info.endpoints.get(frames.DATA_ROLE, ())):
            return
        del self._clashes[endpoint]
        if conn.pub is not None and self._peer_eps.get(conn.pub) == endpoint:
            del self._peer_eps[conn.pub]
        self._drop_conn(endpoint)
        _log.info("pubsub: %s now carries %s's data (%s no longer announces it)", endpoint,
                  pub, conn.pub)
        self._add_peer(info)

    @property
    def _connected(self) -> set[str]:
        """The data endpoints connected now (for tests and diagnostics)."""
        return set(self._by_ep)

    def _subscribe(self, conn: _DataConn) -> None:
        """(Re)send our subscription request on ``conn`` (idempotent at the publisher)."""
        try:
            sub = self._sub_frames if conn.packed else self._sub_frames_old
            self._sock.send_multipart([conn.rid, *sub], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a full pipe: the next resubscribe tries again

    def _add_peer(self, peer: PeerInfo) -> None:
        if peer.node_id == self.node.id and not peer.endpoints.get(frames.DATA_ROLE):
            return
        # Security: never connect to a publisher not allowed to publish what we want from it.
        if not any(self._matches(s) and self.node.permits(peer.node_id, "publish", s)
                   for s in peer.offers.get("stream", ())):
            self._stats.forbidden += 1
            return
        if not peer.endpoints.get(frames.DATA_ROLE) and peer.endpoints.get(frames.OLD_DATA_ROLE):
            # A pub/sub protocol 1 publisher (an XPUB): nothing to connect to; said once.
            self._stats.old_publishers += 1
            if self._first_time(("old", peer.node_id)):
                _log.warning("pubsub: %s publishes with pub/sub protocol 1 (XPUB); this "
                             "subscriber speaks 2 and cannot read it", peer.node_id)
            return
        ep = self.node.connect_endpoint(peer, frames.DATA_ROLE)
        if ep is None:
            return
        old = self._peer_eps.get(peer.node_id)
        pk = peer.public_key
        # Back on the same endpoint with another key (a rotation; data ports come from a
        # range): the connection's handshakes use the old server key, and libzmq would retry
        # them forever. A new connection, with the new key.
        rekeyed = old == ep and self._peer_keys.get(peer.node_id, pk) != pk
        self._peer_eps[peer.node_id] = ep
        self._peer_keys[peer.node_id] = pk
        if rekeyed:
            self._drop_conn(ep)
        self._connect(ep, peer.node_id)
        self._seen(peer.node_id)
        moved = old is not None and (old != ep or rekeyed)
        if old is not None and moved:
            # Restarted (same id, new address), maybe without a LEFT in between: stop
            # reconnecting to the dead address.
            self._disconnect(old)
        now = time.monotonic()
        for stream in peer.offers.get("stream", ()):
            if self._matches(stream) and self.node.permits(peer.node_id, "publish", stream):
                key = (peer.node_id, stream)
                entry = self._trackers.get(key)
                if entry is None:
                    tracker = self._new_tracker(key, replayable=True)
                    self._trackers[key] = (tracker.epoch or 0, tracker)
                    self._apply(key, tracker, tracker.start(now))
                elif moved:
                    # A replay request in flight went to the old incarnation: ask again now.
                    self._apply(key, entry[1], entry[1].on_peer_restart(now))

    def _disconnect(self, endpoint: str) -> None:
        if endpoint in self._static or endpoint in self._peer_eps.values():
            return
        self._drop_conn(endpoint)

    def _drop_conn(self, endpoint: str) -> None:
        self._clashes.pop(endpoint, None)
        conn = self._by_ep.pop(endpoint, None)
        if conn is not None:
            # Its routing id is retired with it: anything still queued on it is dropped.
            self._conns.pop(conn.rid, None)
            try:
                self._sock.disconnect(endpoint)
            except zmq.ZMQError as exc:
                _log.info("pubsub: disconnect from %s: %s", endpoint, exc)

    def _new_tracker(self, key: Key, *, replayable: bool) -> StreamTracker:
        pos = self._positions.get(key)
        st = self.start
        if pos is None and replayable:
            if st.kind == "beginning":
                pos = 0
            elif st.kind == "offset":
                pos = st.value
        from_time = st.value if pos is None and st.kind == "time" and replayable else None
        if pos is None and st.kind == "new" and replayable:
            from_time = self._new_stream_from_time()
        return StreamTracker(pos, replayable=replayable, max_buffer=self.max_buffer,
                             from_time=from_time, retry_s=self.retry_s,
                             epoch=self._pos_epoch.get(key) if replayable else None)

    # --- the pump (iterating thread) -------------------------------------------------------

    def _pump(self, timeout_ms: int) -> None:
        if self._closed:
            raise ClosedError("subscriber is closed")
        if self._inbox:
            self._drain_inbox()
            timeout_ms = 0
        ready = dict(self._poller.poll(timeout_ms))
        if not ready and timeout_ms > 0:
            self._maybe_commit(time.monotonic(), quiet=True)  # waited, and nothing came
        if self._sock in ready:
            self._drain_sub()
        if self._rfd in ready:
            try:
                os.read(self._rfd, 4096)
            except BlockingIOError:
                pass
            self._drain_inbox()
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + 0.1
            for key, (_, tracker) in list(self._trackers.items()):
                self._apply(key, tracker, tracker.on_tick(now))
            if self.node.info() is not self._self_info:
                self._add_self()  # a publisher on this node began (or stopped) offering
            if self._left or self._gone:
                self._prune_gone(now)
            if now >= self._next_resub:
                self._next_resub = now + RESUBSCRIBE_S
                for conn in list(self._conns.values()):
                    self._subscribe(conn)
            self._poll_holdings(now)
            self._maybe_commit(now)

    def _maybe_commit(self, now: float, quiet: bool = False) -> None:
        """Auto commit, while the consumer waits for more (so only what it handled): every
        ``commit_interval_s``, and also when the consumer has handled events and then waited
        :data:`_QUIET_MS` with nothing arriving (``quiet``), at most once per quarter interval.
        A short-lived publisher that lingers for its durable subscribers' acks (a one-shot
        ``mesh pub``, a cron job) is acked within milliseconds instead of a whole interval; a
        busy stream is never quiet, so it still commits once per interval."""
        if not self.auto_commit or self._store is None:
            return
        if now >= self._next_commit or (quiet and self._quiet_due(now)):
            self._next_commit = now + self.commit_interval_s
            self._last_commit = now
            self._moves_at_commit = self._moves
            with self._lock:
                self._commit_positions()

    def _quiet_due(self, now: float) -> bool:
        """Handled events are not committed yet and a quiet commit is allowed now."""
        return (self._moves != self._moves_at_commit
                and now >= self._last_commit + self.commit_interval_s / 4)

    def _drain_sub(self) -> None:
        sock = self._sock
        stats = self._stats
        trackers = self._trackers
        conns = self._conns
        maxsz = self.max_event_size
        decode_message = frames.decode_message
        now = time.monotonic()
        budget = _PUMP_BYTES
        for _ in range(1000):
            if budget <= 0:
                return
            # Frames (copy=False) rather than bytes + get(RCVMORE): pyzmq's get() builds a
            # SocketOption enum per call, while a Frame's `more` is filled in C by the recv
            # itself. Measured (inproc, 170 B frames, timeit): receiving costs 0.70 -> 0.40 µs
            # per frame, and a DATA message carries one frame per event.
            try:
                f = _zrecv(sock, _NOBLOCK, False)  # the routing id of the connection: ours
            except zmq.Again:
                return
            conn = conns.get(f.bytes)
            f = _zrecv(sock, _NOBLOCK, False)  # the rest of a message is already here
            b = f.bytes
            msg = [b]
            nb = len(b)
            while f.more:
                f = _zrecv(sock, _NOBLOCK, False)
                b = f.bytes
                msg.append(b)
                nb += len(b)
            if conn is None:
                continue  # a connection we closed: whatever it still held is not ours to read
            stats.messages += 1
            stats.bytes_in += nb
            budget -= nb
            try:
                stream, head, envs = decode_message(msg, max_event_size=maxsz)
            except UnsupportedVersion as exc:
                stats.bad_version += 1
                self._logs.warning(f"bad:{conn.endpoint}", "pubsub: dropped a message: %s", exc)
                continue
            except EventTooLarge as exc:
                stats.oversize += 1
                self._logs.warning(f"bad:{conn.endpoint}", "pubsub: dropped a message: %s", exc)
                continue
            except ProtocolError as exc:
                stats.bad_frames += 1
                self._logs.warning(f"bad:{conn.endpoint}",
                                   "pubsub: dropped a malformed message: %s", exc)
                continue
            if head.publisher != conn.pub:
                if conn.pub is not None:
                    # Only the owner's connection speaks for a publisher: no forged event,
                    # head or epoch ever reaches the trackers.
                    stats.forged_data += 1
                    self._logs.warning(f"forged:{conn.endpoint}", "pubsub: dropped a message "
                                       "naming publisher %s on the connection to %s (%s)",
                                       head.publisher, conn.pub, conn.endpoint)
                    if self._clashes:
                        self._take_over(conn, head.publisher)
                    continue
                conn.pub = head.publisher  # a static endpoint: pinned to its first publisher
            if head.kind > _KIND_HEARTBEAT:
                self._on_notice(conn, stream, head)
                continue
            if not self._matches(stream):
                continue  # not what we asked for
            key = (head.publisher, stream)
            entry = trackers.get(key)
            if entry is None or entry[0] != head.epoch:
                entry = self._epoch_changed(key, entry, head, now)
                if entry is None:
                    continue
            tracker = entry[1]
            if head.kind == frames.KIND_DATA:
                if envs.__class__ is not list:
                    stats.packed_messages += 1
                if entry[0] == head.epoch and tracker.in_order(head.seq, head.count):
                    # the common case: no Step, no copy
                    self._on_run(key, head.seq, tracker.epoch or 0, envs)
                else:
                    self._apply(key, tracker, tracker.on_live(
                        head.seq, frames.run_envelopes(envs), now))
            else:
                stats.heartbeats += 1
                self._apply(key, tracker, tracker.on_heartbeat(head.seq, now))

    def _first_time(self, what: tuple[str, str]) -> bool:
        """True the first time ``what`` is seen (for "logged once"; the set is bounded)."""
        seen = self._refusals_seen
        if what in seen:
            return False
        if len(seen) >= 1024:
            seen.clear()
        seen.add(what)
        return True

    def _on_notice(self, conn: _DataConn, topic: str, head: frames.Header) -> None:
        """A REFUSED notice (counted, logged once per publisher and topic) or a PING.

        A ``malformed`` refusal of our packed request is a publisher of pub/sub 2.3 or
        earlier, which knows no ``PACKED`` flag: asked again at once without it (one frame
        per envelope on that connection from then on)."""
        if head.kind != frames.KIND_REFUSED:
            return
        if (head.count == frames.REFUSED_MALFORMED and conn.packed
                and topic == self._match and conn.rid in self._conns):
            conn.packed = False
            self._stats.unpacked_publishers += 1
            if self._first_time(("unpacked", head.publisher)):
                _log.info("pubsub: %s does not take packed DATA (pub/sub 2.3 or earlier); "
                          "asking for one frame per event", head.publisher)
            self._subscribe(conn)
            return
        self._stats.subscriptions_refused += 1
        if not self._first_time((head.publisher, topic)):
            return
        _log.warning("pubsub: %s refused the subscription to %r (%s)", head.publisher, topic,
                     frames.REFUSED_REASONS.get(head.count, f"reason {head.count}"))

    def _epoch_changed(self, key: Key, entry: tuple[int, StreamTracker] | None,
                       head: frames.Header, now: float) -> tuple[int, StreamTracker] | None:
        """Live traffic of a (publisher, stream) we have no tracker for, or under another
        epoch than the tracker's: the new entry, or None to drop the message."""
        trackers = self._trackers
        if entry is None and not self.node.permits(head.publisher, "publish", key[1]):
            self._stats.forbidden += 1  # checked once per (publisher, stream), not per event
            return None
        if entry is None or not head.durable or not entry[1].replayable:
            # New, or a best-effort stream restarted (seqs from 0 under a new epoch: what
            # it missed is lost, counted).
            if entry is not None:
                _log.info("pubsub: %s restarted (new epoch); resetting", key)
            tracker = self._new_tracker(key, replayable=head.durable)
            if not head.durable and tracker.expected is None:
                tracker.expected = head.seq if head.kind == frames.KIND_HEARTBEAT else None
            entry = trackers[key] = ((tracker.epoch or 0) if head.durable else head.epoch,
                                     tracker)
            if head.durable:
                self._apply(key, tracker, tracker.start(now))
            if not head.durable or entry[0] == head.epoch:
                return entry
        # Durable under a new writer epoch: confirm with the publisher where it starts
        # before delivering any of it (the tracker holds it meanwhile).
        tracker = entry[1]
        self._apply(key, tracker, tracker.on_epoch(head.epoch, now))
        return trackers[key]

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        now = time.monotonic()
        while inbox:
            item = inbox.popleft()
            if item[0] == "peer":
                self._add_peer(item[1])
                continue
            _, peer_id, data = item
            # A store's answer names the origin whose stream it is (pubsub.fetch); only a peer
            # allowed to replicate that stream speaks for another origin's data.
            if data.origin is not None and data.origin != peer_id and not self.node.permits(
                    peer_id, "replicate", data.stream):
                self._stats.bad_replies += 1
                continue
            key = (data.origin or peer_id, data.stream)
            entry = self._trackers.get(key)
            if entry is None:
                self._stats.bad_replies += 1
                continue
            tracker = entry[1]
            inflight = self._replay_inflight.get(peer_id)
            if inflight is not None:
                inflight.pop(key, None)
            if data.origin is None:
                self._origin_mute.discard(key)  # the origin answers again
            if data.gone and data.origin is None and tracker.expected is not None:
                if self._store_for(key, tracker.expected) is not None:
                    # The origin's retention deleted what a store still holds: read it there.
                    self._origin_floor[key] = data.oldest
                    self._apply(key, tracker, tracker.on_peer_restart(now))
                    continue
                if self._stores_unheard(now):
                    # Stores are up but have not said what they hold yet: ask again shortly
                    # rather than skip what one of them may hold.
                    self._origin_floor[key] = data.oldest
                    tracker.on_replay_busy(data.req, now, 0.2)
                    continue
            if data.error == "busy":
                self._stats.replay_busy += 1
                tracker.on_replay_busy(data.req, now, (data.retry_ms or 500) / 1000)
                continue
            if data.error is not None:
                self._stats.replay_errors += 1
                if data.error in ("not_durable", "forbidden"):
                    tracker.replayable = False
                self._router.logs.log(logging.INFO, f"refused:{peer_id}",
                                      "pubsub: replay of %s refused: %s", key, data.error)
                continue
            self._stats.replay_chunks += 1
            skip = data.skip
            if data.oversize:
                self._stats.oversize += 1
                if not data.events and skip is None:
                    # The chunk starts with an event over our limit (a publisher that does not
                    # read max_event): skip that one rather than ask for it forever.
                    skip = (data.first, data.first + 1, "oversize")
            self._apply(key, tracker, tracker.on_replay(
                data.req, data.first, data.events, data.head, data.oldest, data.gone, now,
                epoch=data.epoch, truncate=data.truncate, skip=skip,
                epoch_end=data.epoch_end))


    def _apply(self, key: Key, tracker: StreamTracker, step: Step) -> None:
        ready = self._ready
        if step.epoch is not None:
            epoch, rewind_to, lost = step.epoch
            self._trackers[key] = (epoch, tracker)
            gap: StreamGap | None = None
            if lost is not None:
                gap = StreamReset(key[0], key[1], lost[0], lost[1], epoch=epoch,
                                  resume_at=rewind_to if rewind_to is not None else lost[0],
                                  delivered=lost[2])
                self._stats.resets += 1
                self._stats.lost += max(0, lost[1] - lost[0] - lost[2])
                self._router.logs.warning(f"gap:{key[0]}", "pubsub: %s", gap)
            self._stats.epochs += 1
            # In order: positions before it stay under the old epoch until it is reached.
            ready.append((key, rewind_to if rewind_to is not None else -1,
                          _Mark(rewind_to, epoch, gap, self.on_gap == "error")))
        if step.skipped is not None:
            a, b = step.skipped
            reason = step.skip_reason
            gap = None
            self._stats.skipped += b - a
            self._router.logs.warning(f"gap:{key[0]}", "pubsub: %s events %d..%d will not be "
                                      "delivered (%s)", key, a, b - 1, reason)
            if reason == "retention":
                # "From the beginning" means from the oldest kept: losing 0.. is expected.
                expected = (self.start.kind == "beginning" and key not in self._committed
                            and a == 0)
                gap = None if expected or not tracker.replayable else \
                    RetentionGap(key[0], key[1], a, b)
                policy = self.on_retention
            else:
                gap = StreamGap(key[0], key[1], a, b, reason)
                policy = self.on_gap
            # The position passes the gap only when iteration reaches it (in order).
            ready.append((key, b - 1, _Mark(b, None, gap, policy == "error")))
        for first, payloads in step.deliver:
            self._on_run(key, first, tracker.epoch or 0, payloads)
        if step.ask is not None:
            self._send_ask(key, tracker, step.ask)

    def _on_run(self, key: Key, first: int, epoch: int, run: frames.Run) -> None:
        """The one place every delivered event goes through: a contiguous run of envelopes
        of stream ``key`` arrived, seqs from ``first``, in order and new (the tracker has
        already moved past them), under writer epoch ``epoch`` (the tracker's confirmed
        one; 0 when unknown or best-effort). Live DATA (either layout) and replay chunks
        alike come here, so a subclass that overrides it sees every run however it arrived
        (the store's follower writes them to its replica instead of decoding them).

        ``run`` is the envelopes' bytes (a list, one per event) or a packed message's
        :class:`~patterns.pubsub.frames.Packed`; :func:`~patterns.pubsub.frames.run_envelopes`
        gives the exact bytes of either. This implementation decodes them into the ready
        queue (verified first when ``verify`` is on).
        """
        if run.__class__ is list:
            self._deliver(key, first, run)
            return
        packed: frames.Packed = run  # type: ignore[assignment]
        arrays = packed.arrays
        if arrays is None or self._verifier is not None:
            self._deliver(key, first, packed.envelopes())  # signatures need the bytes
            return
        try:
            # Unpacked in one C pass already (frames.decode_message): build the events.
            events = list(map(from_unpacked, arrays))
        except CodecError:
            self._deliver(key, first, packed.envelopes())  # the bad one becomes a gap
            return
        self._ready.append((key, first, events))  # one item for the whole run

    def _deliver(self, key: Key, first: int, payloads: list[bytes]) -> None:
        """Decode a contiguous run of envelopes into the ready queue (see :meth:`_on_run`)."""
        if self._verifier is not None:
            self._deliver_verified(key, first, payloads, self._verifier)
            return
        ready = self._ready
        maxsz = self.max_event_size
        if not payloads:
            return
        try:
            # The common case, every envelope decodes: the loop runs in C, one queue item.
            events = list(map(decode, payloads, repeat(maxsz)))
        except CodecError:
            pass  # decoded again one by one below: the bad one becomes a gap at its seq
        else:
            ready.append((key, first, events))
            return
        seq = first
        run: list[Event] = []
        for buf in payloads:
            try:
                run.append(decode(buf, maxsz))
            except CodecError as exc:
                if run:
                    ready.append((key, seq - len(run), run))
                    run = []
                self._undecodable(key, seq, exc)
            seq += 1
        if run:
            ready.append((key, seq - len(run), run))

    def _undecodable(self, key: Key, seq: int, exc: CodecError) -> None:
        # Logged but undecodable: a typed gap (counted), never a stall; the position passes
        # it only when iteration reaches it, never over events still waiting before it.
        self._stats.bad_events += 1
        self._logs.warning(f"undecodable:{key[0]}", "pubsub: undecodable event %s #%d: %s",
                           key, seq, exc)
        reason = "oversize" if isinstance(exc, EventTooLarge) else "undecodable"
        self._ready.append((key, seq, _Mark(seq + 1, None,
                                            StreamGap(key[0], key[1], seq, seq + 1, reason),
                                            self.on_gap == "error")))

    def _deliver_verified(self, key: Key, first: int, payloads: list[bytes],
                          verifier: EventVerifier) -> None:
        """As :meth:`_deliver`, keeping only events whose signature verifies."""
        ready = self._ready
        maxsz = self.max_event_size
        seq = first
        run: list[Event] = []  # verified events since the last mark: one queue item
        for buf in payloads:
            try:
                ev = decode(buf, maxsz)
                verifier.verify(ev)
            except (CodecError, SignatureInvalid) as exc:
                if run:
                    ready.append((key, seq - len(run), run))
                    run = []
                if isinstance(exc, CodecError):
                    self._undecodable(key, seq, exc)
                else:
                    self._stats.bad_signatures += 1
                    self._logs.warning(f"signature:{key[0]}", "pubsub: event %s #%d refused: "
                                       "%s", key, seq, exc)
                    # The cursor passes it in order, when iteration reaches it.
                    ready.append((key, seq, _Mark(seq + 1, None, None)))
            else:
                run.append(ev)
            seq += 1
        if run:
            ready.append((key, seq - len(run), run))

    def _replay_slot(self, pub: str, key: Key, now: float) -> float:
        """0.0 when a request to ``pub`` may go now (and it is counted), else how long to
        wait: at most ``replay_rate`` requests a second and ``replay_outstanding`` unanswered
        ones per publisher, whatever heads and replies it (or anyone) sends."""
        inflight = self._replay_inflight.setdefault(pub, {})
        inflight.pop(key, None)  # this stream's earlier request is answered or abandoned
        if len(inflight) >= self.replay_outstanding:
            for k in [k for k, t in inflight.items() if now - t >= self.retry_s]:
                del inflight[k]  # unanswered past retry_s: lost, not outstanding
            if len(inflight) >= self.replay_outstanding:
                return 0.1
        b = self._replay_bucket.get(pub)
        if b is None:
            b = self._replay_bucket[pub] = [self.replay_rate, now]
        b[0] = min(self.replay_rate, b[0] + (now - b[1]) * self.replay_rate)
        b[1] = now
        if b[0] < 1.0:
            return (1.0 - b[0]) / self.replay_rate
        b[0] -= 1.0
        inflight[key] = now
        return 0.0

    def _send_ask(self, key: Key, tracker: StreamTracker, ask: ReplayAsk) -> None:
        now = time.monotonic()
        # The origin serves its stream while it is live and holds the range; otherwise a
        # store that holds it (same request, plus the origin: pubsub.fetch).
        target = key[0]
        retries = tracker.stats.replay_retries
        if retries > self._retries_seen.get(key, retries) and key[0] != self.node.id:
            self._origin_mute.add(key)  # our last request went unanswered for retry_s
        self._retries_seen[key] = retries
        store = None if self._origin_serves(key, ask.start) else \
            self._store_for(key, ask.start)
        if store is not None:
            target = store
        if target != self.node.id:
            wait = self._replay_slot(target, key, now)
            if wait:
                self._stats.replay_deferred += 1
                tracker.defer(now, wait)
                return
        rq = frames.ReplayRequest(self.sid, ask.req, key[1], ask.start, ask.from_time,
                                  ask.end, self.replay_chunk, self.replay_bytes, ask.epoch,
                                  self.max_event_size, self._router.last_tok.get(target),
                                  key[0] if store is not None else None)
        try:
            self._ctrl_send(target, frames.CTRL_FETCH if store is not None
                            else frames.CTRL_REPLAY, rq.to_body())
        except MeshError as exc:
            # Unreachable for now: the tracker re-sends after retry_s.
            self._router.logs.log(logging.INFO, f"unsent:{target}", "pubsub: replay request to "
                                  "%s not sent: %s", target, exc)

    # --- replicated streams: the replay source (patterns/pubsub/store.py) ------------------

    def _origin_serves(self, key: Key, start: int | None) -> bool:
        """The origin is live (its data endpoint is known and it did not leave) and, as far
        as we know, still holds ``start`` (it did not answer "gone" for it)."""
        pub = key[0]
        if pub not in self._peer_eps or pub in self._left:
            return bool(pub == self.node.id)
        if key in self._origin_mute and self._store_for(key, start) is not None:
            return False  # live, but it did not answer: a store serves until it does
        floor = self._origin_floor.get(key)
        return floor is None or start is None or start >= floor

    def _store_for(self, key: Key, start: int | None) -> str | None:
        """The live store that holds the most of ``key`` from ``start`` on (None: none)."""
        best, best_head = None, -1
        for store, (oldest, head, _epoch) in self._board.holders(key, self._live_stores).items():
            if not self.node.permits(store, "replicate", key[1]):
                continue
            if (start is None or oldest <= start < head) and head > best_head:
                best, best_head = store, head
        return best

    def _stores_unheard(self, now: float) -> bool:
        """Some live store has not answered a holdings request of ours yet (one is sent),
        for at most 3 x HOLDINGS_S: a store that never answers does not hold a gap open."""
        board = self._board
        stores = [s for s in board.stores() if s != self.node.id]
        if not stores:
            return False
        if self._holdings_since is None:
            self._holdings_since = now
        if now - self._holdings_since > 3 * HOLDINGS_S:
            return False
        self._next_holdings = min(self._next_holdings, now)  # the next tick asks
        return any(board.answered.get(s, -1.0) < self._holdings_since for s in stores)

    def _poll_holdings(self, now: float) -> None:
        """Owner tick: ask the stores what they hold of our topic (every HOLDINGS_S), start
        tracking origin streams known only from a store, and tell the trackers of streams
        whose origin is not live the stores' heads (as a heartbeat would)."""
        board = self._board
        if now >= self._next_holdings:
            self._next_holdings = now + HOLDINGS_S
            self._live_stores = {s for s in board.stores() if s != self.node.id}
            local = self._local_store()
            if local is not None:  # this node's own store: read directly, no control channel
                me = self.node.id
                self._live_stores.add(me)
                for h in local.holdings():
                    board.rows.setdefault((h.origin, h.stream), {})[me] = (
                        h.oldest, h.head, h.epoch)
            if self._live_stores - {self.node.id}:
                if self._holdings_since is None:
                    self._holdings_since = now
                board.ask(self._match)
        if not self._live_stores:
            return
        for key in board.keys():  # noqa: SIM118  # a copy (a list): the reactor adds rows
            pub, stream = key
            if not self._matches(stream) or pub == self.node.id:
                continue
            held = board.holders(key, self._live_stores)
            if not held:
                continue
            entry = self._trackers.get(key)
            if entry is None:
                if not self.node.permits(pub, "publish", stream) or not any(
                        self.node.permits(s, "replicate", stream) for s in held):
                    continue
                tracker = self._new_tracker(key, replayable=True)
                self._trackers[key] = (tracker.epoch or 0, tracker)
                self._apply(key, tracker, tracker.start(now))
                entry = self._trackers[key]
            if not self._origin_serves(key, entry[1].expected):
                head = max(r[1] for r in held.values())
                self._apply(key, entry[1], entry[1].on_heartbeat(head, now))

    # --- positions and commits -------------------------------------------------------------

    def _done(self) -> None:
        """Mark what was handed out processed (under ``_lock``): the next one is asked for."""
        cur = self._cur
        if cur is not None:
            self._cur = None
            self._positions[cur[0]] = cur[1] + 1
            self._moves += 1
        batch = self._batch
        if batch is not None:
            self._batch = None
            batch._settle(self._positions, batch._n)
            self._moves += 1

    def _abandon(self) -> None:
        """The handler failed (under ``_lock``): keep only what a batch iteration passed."""
        self._cur = None
        batch = self._batch
        if batch is not None:
            self._batch = None
            batch._settle(self._positions, batch._passed)

    def _reach(self, key: Key, mark: _Mark) -> None:
        """Iteration reached a mark (every event before it is processed): apply it."""
        if mark.epoch is not None:
            self._pos_epoch[key] = mark.epoch
        if mark.pos is not None:
            self._positions[key] = mark.pos
            self._moves += 1
        gap = mark.gap
        if gap is not None:
            self._stats.gap_notices += 1
            self._gaps.append(gap)
            if mark.raise_it:
                raise gap

    def gaps(self) -> list[StreamGap]:
        """The most recent gap notices (at most 100, oldest first), raised or not."""
        with self._lock:
            return list(self._gaps)

    def _commit_positions(self) -> None:
        pe = self._pos_epoch
        committed = self._committed
        dirty = {k: (v, pe.get(k)) for k, v in list(self._positions.items())
                 if committed.get(k) != (v, pe.get(k))}
        if not dirty:
            return
        if self._store is not None:
            self._store.put_many(self._cursor_ns, {f"{p}/{s}": list(v)
                                                   for (p, s), v in dirty.items()})
            committed.update(dirty)
            self._stats.commits += 1
            for (pub, stream), (pos, _epoch) in dirty.items():
                try:
                    self._ctrl_send(pub, frames.CTRL_ACK,
                                    frames.Ack(self.durable or "", stream, pos).to_body())
                except MeshError:
                    pass  # the publisher learns it at the next commit


    def commit(self) -> None:
        """Commit the position past every event handed out so far (including the current one;
        in a :class:`Batch` being iterated, up to the event the iteration is on).

        From a thread other than the owner, commits what the owner has finished (never the
        event it is handling).

        Raises:
            StateError: the cursor store failed.
        """
        with self._lock:
            if self._owner is None or self._owner == threading.get_ident():
                self._done_handed()
            self._commit_positions()

    def _done_handed(self) -> None:
        """The owner's commit (under ``_lock``): what was handed out counts processed."""
        batch = self._batch
        if batch is None:
            self._done()
            return
        n = batch._handed
        batch._settle(self._positions, n)
        if n >= batch._n:
            self._batch = None

    def commit_upto(self, keep: int) -> None:
        """Commit; with ``keep`` > 0 the events still handed out are not counted processed.

        Raises:
            StateError: the cursor store failed.
        """
        with self._lock:
            if keep <= 0 and (self._owner is None or self._owner == threading.get_ident()):
                self._done_handed()
            self._commit_positions()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # --- receiving (owner thread) ----------------------------------------------------------

    def _claim(self) -> None:
        """Make the calling thread the owner, or refuse (WrongThread)."""
        me = threading.get_ident()
        with self._lock:
            if self._owner is None:
                self._owner = me
                return
        if self._owner != me:
            raise WrongThread(f"subscriber of {self.topic!r} is owned by another thread "
                              "(one thread receives; see the class docstring)")

    def _pump_slice(self, timeout_ms: int) -> None:
        """One poll slice of the owner, holding only ``_pump_lock`` (close() waits for it)."""
        with self._pump_lock:
            self._pump(timeout_ms)

    def _next_ready(self) -> Event | None:
        """Under ``_lock``, nothing handed out: the next event, passing markers in order."""
        ready = self._ready
        while ready:
            key, first, run = ready[0]
            if run.__class__ is list:
                events: list[Event] = run
                off = self._off
                ev = events[off]
                self._cur = (key, first + off, ev)
                off += 1
                if off == len(events):
                    ready.popleft()
                    off = 0
                self._off = off
                return ev
            ready.popleft()
            self._reach(key, run)  # type: ignore[arg-type]  # a mark, applied in order
        return None

    def _take(self, max_events: int, spans: list[Span] | None) -> list[ReadyItem]:
        """Under ``_lock``: the ready items holding up to ``max_events`` events from the
        head, a run cut where the count ends (its rest stays at the head). With ``spans``
        (a batch): runs only, stopping at the first mark, each one's span appended; else
        marks are taken too (each counts as one)."""
        ready = self._ready
        out: list[ReadyItem] = []
        n = 0
        while n < max_events and ready:
            item = ready[0]
            run = item[2]
            if run.__class__ is not list:
                if spans is not None:
                    break  # a gap or skipped event: handled in order by the next call
                out.append(ready.popleft())
                n += 1
                continue
            events: list[Event] = run
            size = len(events)
            off = self._off
            take = min(size - off, max_events - n)
            start = item[1] + off
            if off == 0 and take == size:
                out.append(ready.popleft())
            else:
                out.append((item[0], start, events[off:off + take]))
                off += take
                if off == size:
                    ready.popleft()
                    off = 0
                self._off = off
            if spans is not None:
                spans.append((item[0], start, take))
            n += take
        return out

    def _wait_ready(self, deadline: float | None) -> bool:
        """Pump until the ready queue has something (True) or ``deadline`` passed (False)."""
        while not self._ready:
            # Handled events wait for a commit: poll briefly, so a quiet stream commits soon.
            wait = (_QUIET_MS if self.auto_commit and self._store is not None
                    and self._quiet_due(time.monotonic()) else 100)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, int(left * 1000) + 1)
            self._pump_slice(wait)
        return True

    def _recv_items(self, timeout: float, max_events: int) -> list[ReadyItem]:
        """For AsyncSubscriber (its one executor thread owns the subscriber): raw ready
        items (runs of events, skip markers, gaps) holding up to ``max_events`` events. They
        belong to the caller, which moves the positions as it hands them out."""
        if self._owner != threading.get_ident():
            self._claim()
        if self._closed or not self._wait_ready(time.monotonic() + timeout):
            return []
        with self._lock:
            return self._take(max_events, None)

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever).

        Asking for the next event marks the previous one as processed (its position is
        committed at the next commit).

        Raises:
            ClosedError: the subscriber is closed.
            WrongThread: another thread owns the subscriber.
            RetentionGap: with ``on_retention="error"``, events were deleted before delivery.
        """
        if self._owner != threading.get_ident():
            self._claim()
        with self._lock:
            self._done()
            if self._ready:
                ev = self._next_ready()
                if ev is not None:
                    if self._ready:
                        # Draining a backlog (a replay) never waits on the socket, where the
                        # periodic commit otherwise runs: commit here too, or a crash mid
                        # catch-up redoes it all.
                        self._maybe_commit(time.monotonic())
                    return ev
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._wait_ready(deadline):
            with self._lock:
                ev = self._next_ready()
            if ev is not None:
                return ev
        return None

    def recv_batch(self, timeout: float | None = None, max_events: int = 1000) -> Batch:
        """Up to ``max_events`` events (at least one unless ``timeout`` passed).

        Commit means handled (see :class:`Batch`): iterating the batch marks each event
        processed when the next is taken; a batch not iterated counts as processed when the
        next call asks for more.

        Raises:
            ClosedError: the subscriber is closed.
            WrongThread: another thread owns the subscriber.
            RetentionGap: as :meth:`recv` (events before the gap are returned first).
        """
        first = self.recv(timeout)
        out = Batch()
        if first is None:
            return out
        with self._lock:
            item = self._cur
            assert item is not None
            self._cur = None
            spans: list[Span] = [(item[0], item[1], 1)]
            out.append(first)
            if self._ready and max_events > 1:
                # Whole runs (one list extend each, in C), the last one cut at max_events;
                # the batch stops before a gap or skipped event (handled in order by the
                # next call).
                for _key, _first, run in self._take(max_events - 1, spans):
                    out.extend(run)  # type: ignore[arg-type]
            out._spans = spans
            out._n = len(out)
            self._batch = out
        return out

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            ev = self.recv()
        except ClosedError:
            raise StopIteration from None
        assert ev is not None
        use_event(ev)  # the loop body is this event's handler (trace context defaults)
        return ev

    def run(self, handler: Callable[[Event], object], *,
            stop: threading.Event | None = None) -> None:
        """Call ``handler(event)`` for every event until ``stop`` is set or the subscriber is
        closed. An event counts as processed (committable) once ``handler`` returned; if it
        raises, the exception propagates and the event stays uncommitted.

        Raises:
            WrongThread: another thread owns the subscriber.
            RetentionGap: with ``on_retention="error"``.
        """
        while stop is None or not stop.is_set():
            try:
                ev = self.recv(timeout=0.1)
            except ClosedError:
                return
            if ev is None:
                continue
            started = time.perf_counter()
            try:
                with consuming(ev):
                    handler(ev)
            except BaseException:
                self._processing.observe(started, True)
                with self._lock:
                    self._abandon()  # not processed: never committed, comes again
                raise
            self._processing.observe(started, False)
            with self._lock:
                self._done()

    # --- same node, peers that left, start times -------------------------------------------

    def _new_stream_from_time(self) -> int | None:
        """Start.new for a durable stream first seen after construction: from our start
        time (UTC ns) minus the skew allowance; streams found at construction: the head."""
        if self._constructing:
            return None
        return max(0, self._started_ns - int(self.new_stream_skew_s * 1e9))

    def _add_self(self) -> None:
        """Subscribe to this node's own publishers (who_offers and peer events never list
        the node itself). Owner thread, or construction."""
        info = self.node.info()
        self._self_info = info
        if self._offers_match(info):
            self._add_peer(info)

    def _ctrl_send(self, peer: str, kind: str, body: object) -> None:
        """``node.send``, except to this node itself (which the node cannot send to): then
        the node's own pub hub answers on the reactor thread, as it would a peer."""
        if peer != self.node.id:
            self.node.send(peer, kind, body)
            return
        raw = control.encode_body(body, self.node.config.max_message_bytes)  # as on the wire
        self.node.reactor.call_soon(self._local_ctrl, kind, raw)

    def _local_ctrl(self, kind: str, raw: bytes) -> None:
        """Reactor thread: a replay request or ack addressed to this node's own hub (or a
        fetch addressed to this node's own store)."""
        if kind == frames.CTRL_FETCH:
            self._local_fetch(raw)
            return
        hub = _registry.peek(self.node, "pubsub.pub")
        if hub is None:
            return  # no publisher here (any more): the tracker retries after retry_s
        body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        me = self.node.id
        if kind == frames.CTRL_ACK:
            hub._on_ack(me, body)
            return
        try:
            rq = frames.decode_replay_request(body)
        except (ProtocolError, CodecError) as exc:
            _log.warning("pubsub: bad local replay request: %s", exc)
            return
        reply = hub._serve(rq).to_body()
        self._router._on_data(me, msgpack.unpackb(
            control.encode_body(reply, 1 << 62), raw=False, strict_map_key=False))

    def _local_fetch(self, raw: bytes) -> None:
        """Reactor thread: a fetch from this node's own store (patterns/pubsub/store.py)."""
        store = _registry.peek(self.node, "pubsub.store")
        if store is None:
            return  # closed meanwhile: the tracker retries after retry_s
        try:
            rq = frames.decode_fetch(msgpack.unpackb(raw, raw=False, strict_map_key=False))
        except (ProtocolError, CodecError) as exc:
            _log.warning("pubsub: bad local fetch: %s", exc)
            return
        reply = store._serve(rq).to_body()
        self._router._on_data(self.node.id, msgpack.unpackb(
            control.encode_body(reply, 1 << 62), raw=False, strict_map_key=False))

    def _local_store(self) -> Any:
        """This node's own store, when one runs and this subscriber is not its follower."""
        if hasattr(self, "_owner_store"):
            return None  # a store's follower never reads from itself
        return _registry.peek(self.node, "pubsub.store")

    def _seen(self, pub: str) -> None:
        """A publisher is (back) in the mesh: its cursor rows are not orphaned."""
        self._left.pop(pub, None)
        if self._gone.pop(pub, None) is not None and self._store is not None:
            self._store.delete(self._gone_ns, pub)

    def _load_gone(self) -> None:
        """Durable: when each cursor row's publisher was last known gone (across restarts).
        A publisher with cursor rows that is not seen while we run ages from now."""
        assert self._store is not None
        for pub, v in self._store.items(self._gone_ns):
            if isinstance(v, int):
                self._gone[pub] = v
        now = time.time_ns()
        fresh = {p: now for p, _ in self._committed if p not in self._gone}
        if fresh:
            self._gone.update(fresh)
            self._store.put_many(self._gone_ns, fresh)

    def _prune_gone(self, now: float) -> None:
        """Owner tick: forget publishers gone past ``forget_after_s``, and durable cursor
        rows orphaned past ``forget_cursors_after_s``."""
        for pub, left_at in list(self._left.items()):
            if now - left_at >= self.forget_after_s and pub != self.node.id:
                self._left.pop(pub, None)
                with self._lock:
                    self._drop_publisher(pub, cursors=False)
                _log.info("pubsub: forgot publisher %s (gone %.0f s)", pub, now - left_at)
        if self._gone:
            wall = time.time_ns()
            limit = int(self.forget_cursors_after_s * 1e9)
            for pub, since in list(self._gone.items()):
                if wall - since < limit:
                    continue
                if pub in self._peer_eps or any(k[0] == pub for k in self._trackers):
                    self._seen(pub)  # alive after all (maybe through a static endpoint)
                    continue
                with self._lock:
                    self._drop_publisher(pub, cursors=True)

    def _drop_publisher(self, pub: str, *, cursors: bool) -> None:
        """Drop a publisher's trackers and data connection; with ``cursors`` its positions
        and cursor rows too (else start their forget_cursors_after_s clock)."""
        for key in [k for k in self._trackers if k[0] == pub]:
            del self._trackers[key]
        self._replay_bucket.pop(pub, None)
        self._replay_inflight.pop(pub, None)
        ep = self._peer_eps.pop(pub, None)
        self._peer_keys.pop(pub, None)
        if ep is not None:
            self._disconnect(ep)
        store = self._store
        if not cursors:
            # Positions stay (a returning publisher continues where we were) until it has
            # been gone forget_cursors_after_s; durable: the clock is persisted.
            if pub not in self._gone and any(k[0] == pub for k in self._positions):
                self._gone[pub] = time.time_ns()
                if store is not None:
                    store.put(self._gone_ns, pub, self._gone[pub])
            return
        for key in [k for k in self._positions if k[0] == pub]:
            del self._positions[key]
            self._pos_epoch.pop(key, None)
            self._committed.pop(key, None)
            if store is not None:
                store.delete(self._cursor_ns, f"{key[0]}/{key[1]}")
        if self._gone.pop(pub, None) is not None and store is not None:
            store.delete(self._gone_ns, pub)

    def forget(self, publisher: str) -> None:
        """Forget ``publisher`` now: its trackers, its data connection and (durable) its
        cursor rows. If it comes back, its streams start as new ones (per ``start``).

        Safe from any thread (waits for the owner's current poll slice).

        Raises:
            ClosedError: the subscriber is closed.
            StateError: the cursor store failed.
        """
        if self._closed:
            raise ClosedError("subscriber is closed")
        with self._pump_lock, self._lock:
            self._left.pop(publisher, None)
            self._drop_publisher(publisher, cursors=True)

    # --- introspection / lifecycle ---------------------------------------------------------

    def stats(self) -> SubscriberStats:
        """Counters (summed over the streams) and the current lag.

        Lock free (a snapshot that may be one receive behind): never waits on a thread
        blocked in :meth:`recv`, so ``node.stats()`` and metric scrapes never do either.
        """
        s = SubscriberStats(**self._stats.__dict__)
        trackers = list(self._trackers.values())  # one C call: safe against the owner
        s.streams = len(trackers)
        for _, t in trackers:
            ts = t.stats
            s.delivered += ts.delivered
            s.duplicates += ts.duplicates
            s.gaps += ts.gaps
            s.buffered += ts.buffered
            s.buffer_dropped += ts.buffer_dropped
            s.replayed += ts.replayed
            s.replay_requests += ts.replay_requests
            s.replay_retries += ts.replay_retries
            s.replay_idle += ts.replay_idle
            s.lag += t.lag
        return s

    def positions(self) -> dict[Key, int]:
        """The position (next seq to process) per (publisher, stream) processed so far."""
        with self._lock:  # never held across a wait
            return dict(self._positions)

    def close(self, unhanded: int = 0) -> None:
        """Commit (with auto commit), close the socket and the cursor store. Idempotent.

        Safe from any thread: a receive in progress on the owner thread is woken and ends
        with :class:`~mesh.errors.ClosedError` (``for event in sub`` simply stops).

        Args:
            unhanded: non-zero: what is handed out now was not processed (not committed).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            os.write(self._wfd, b"\0")  # wake the owner's poll
        except OSError:
            pass
        with self._pump_lock, self._lock:
            self._unmetrics()
            self._unclose()
            self._unsubscribe_peers()
            self._router.subs.pop(self.sid, None)
            if not self._router.subs:
                _registry.drop(self.node, "pubsub.sub", self._router)
            try:
                if self.auto_commit and self._store is not None:
                    if unhanded:
                        self._abandon()
                    elif self._owner is None or self._owner == threading.get_ident():
                        self._done_handed()
                    self._commit_positions()
            finally:
                if self._store is not None:
                    self._store.close()
                self._sock.close(linger=0)
                os.close(self._rfd)
                os.close(self._wfd)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, et: type[BaseException] | None, *exc: object) -> None:
        if et is not None:
            # The block failed while handling the current event: do not commit past it.
            with self._lock:
                self._abandon()
        self.close()

