"""The subscribing side: a SUB socket, one gap tracker per (publisher, stream), replay, cursors.

Threading: the SUB socket belongs to the Subscriber and is only touched by the thread that is
iterating (guarded by a lock). Control replies (``pubsub.replay_data``) and peer events arrive on
the node's reactor thread; they are validated there and handed over through a deque plus a
one-byte wake-up on a pipe the iterating thread polls beside the SUB socket: one hand-over per
replay chunk, never one per event.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import zmq

from mesh.envelope import DEFAULT_MAX_EVENT_BYTES, Event, decode
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    EventTooLarge,
    MeshError,
    ProtocolError,
    SignatureInvalid,
    UnsupportedVersion,
)
from mesh.peers import PeerEvent, PeerEventKind, PeerInfo
from mesh.security.signing import EventVerifier
from mesh.state import StateStore
from mesh.tracing import consuming, use_event
from patterns._metrics import Processing, attach, subscriber_collector
from patterns.pubsub import _registry, frames
from patterns.pubsub.gaps import ReplayAsk, Step, StreamTracker

__all__ = ["RetentionGap", "Start", "StreamGap", "StreamReset", "Subscriber", "SubscriberStats"]

_log = logging.getLogger("zeromesh.pubsub")

# pyzmq's recv_multipart costs ~6-8 µs per 3-frame message in Python (a sugar recv and a
# getsockopt with enum conversion per frame); the backend recv with int flags, copy=False and
# Frame.more for the message boundary, a fraction of that (see _drain_sub).
_zrecv: Any = zmq.backend.Socket.recv
_NOBLOCK = int(zmq.NOBLOCK)
#: The SUB socket's default RCVHWM in messages (publisher.DATA_HWM: 32 MiB of 32 KiB messages).
_DATA_HWM = 1024
#: One pump decodes at most about this many bytes of DATA (some 1,300 events of 100 B, and
#: at least one message) into the ready queue however much is queued: what a stuck or slow
#: handler holds decoded stays small (it was up to 1,000 messages of 1,000 events).
_PUMP_BYTES = 256 << 10

Key = tuple[str, str]  # (publisher node id, stream)


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
        """Only events published after the subscriber found the publisher."""
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
        node.handle(frames.CTRL_REPLAY_DATA, self._on_data)

    def _on_data(self, peer_id: str, body: object) -> None:
        sid = body.get("sid") if isinstance(body, dict) else None
        sub = self.subs.get(sid) if isinstance(sid, str) else None
        if sub is None:
            self.bad += 1
            _log.warning("pubsub: replay data from %s for no subscriber", peer_id)
            return
        try:
            data = frames.decode_replay_data(body, max_event_size=sub.max_event_size)
        except (ProtocolError, CodecError) as exc:
            sub._count_bad_reply(exc)
            _log.warning("pubsub: bad replay data from %s: %s", peer_id, exc)
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
        commit_interval_s: how often auto commit writes (and acks the position to publishers).
        endpoints: static data endpoints of publishers (``tcp://...`` / ``ipc://...``).
        on_retention: ``"skip"`` (count and go on at the oldest kept event) or ``"error"``
            (raise :class:`RetentionGap` from the iteration, then go on).
        on_gap: what every other gap does (:class:`StreamGap`: damaged in the publisher's
            log, oversize, undecodable, and :class:`StreamReset` when the publisher's log lost
            seqs): ``"skip"`` counts, logs and records it (:meth:`gaps`), ``"error"`` raises it
            from the iteration in order, then goes on. Default: as ``on_retention``.
        rcvhwm: the SUB receive high-water mark in messages (default 1024: 32 MiB of the
            publishers' messages of up to 32 KiB).
        max_buffer: live events held per stream while a hole is replayed.
        replay_chunk: events per replay reply.
        max_event_size: larger envelopes are counted and dropped.
        retry_s: re-send an unanswered replay request after this long.
        verify: end-to-end signature check of every delivered event, live or replayed
            (mesh.security.signing): ``True`` with the node's verifier (the keys of
            ``SecurityConfig.event_keys``, plus the node's own signing key), an
            :class:`~mesh.security.signing.EventVerifier` with its keys, ``False`` never,
            ``None`` (default) exactly when the node's ``SecurityConfig.event_keys`` is not
            empty. An event that fails (unsigned, unknown key, altered) is not delivered: it
            is counted (``SubscriberStats.bad_signatures``), logged, and the stream moves on
            past it in order (it is never retried; the cursor passes it with the next event
            processed after it).

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
                 verify: bool | EventVerifier | None = None,
                 on_gap: Literal["skip", "error"] | None = None) -> None:
        if not topic:
            raise ConfigError("topic must not be empty")
        if on_retention not in ("skip", "error"):
            raise ConfigError(f"on_retention must be 'skip' or 'error', got {on_retention!r}")
        if replay_chunk <= 0 or max_buffer < 0:
            raise ConfigError("replay_chunk must be > 0 and max_buffer >= 0")
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
        self._verifier = _resolve_verifier(node, verify)
        self.sid = uuid.uuid4().hex
        self._stats = SubscriberStats()
        self._lock = threading.RLock()
        self._closed = False
        self._trackers: dict[Key, tuple[int, StreamTracker]] = {}
        self._ready: collections.deque[tuple[Key, int, Event | _Mark]] = (
            collections.deque())
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._positions: dict[Key, int] = {}
        # The writer epoch each position was reached under (None: unknown, older cursor);
        # committed with it, so a restart can ask the publisher whether its log still agrees.
        self._pos_epoch: dict[Key, int | None] = {}
        self._committed: dict[Key, tuple[int, int | None]] = {}
        # Events handed out and not yet known to be processed (oldest first).
        self._handed: collections.deque[tuple[Key, int]] = collections.deque()
        self._connected: set[str] = set()
        self._static = set(endpoints)
        self._peer_eps: dict[str, str] = {}  # publisher node id -> the data endpoint we use
        self._next_tick = 0.0
        self._next_commit = time.monotonic() + commit_interval_s
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
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        sock = node.socket(zmq.SUB, "sub")
        # Bounded in bytes: publishers cut DATA messages at 32 KiB, so 1024 of them queue at
        # most 32 MiB (publisher.DATA_HWM); beyond that the publisher drops and we replay.
        sock.setsockopt(zmq.RCVHWM, rcvhwm if rcvhwm is not None else _DATA_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self._match.encode())
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._rfd, zmq.POLLIN)
        self._router = _registry.get_or_create(node, "pubsub.sub", lambda: _SubRouter(node))
        self._router.subs[self.sid] = self
        for ep in endpoints:
            self._connect(ep)
        self._unsubscribe_peers: Callable[[], None] = node.on_peer(self._on_peer_event)
        self._processing = Processing(node, "pubsub", topic)
        self._unmetrics = attach(node, subscriber_collector(self))
        with self._lock:
            for peer in self._offering_peers():
                self._add_peer(peer)

    # --- cross-thread hand-over ------------------------------------------------------------

    def _post(self, item: tuple[Any, ...]) -> None:
        """Called on the reactor thread: queue ``item`` and wake the iterating thread."""
        self._inbox.append(item)
        try:
            os.write(self._wfd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already awake) or closed

    def _on_peer_event(self, ev: PeerEvent) -> None:
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

    def _connect(self, endpoint: str) -> None:
        if endpoint in self._connected:
            return
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {endpoint!r}: {exc}") from exc
        self._connected.add(endpoint)

    def _add_peer(self, peer: PeerInfo) -> None:
        if peer.node_id == self.node.id and not peer.endpoints.get("pub"):
            return
        # Security: never connect to a publisher not allowed to publish what we want from it.
        if not any(self._matches(s) and self.node.permits(peer.node_id, "publish", s)
                   for s in peer.offers.get("stream", ())):
            self._stats.forbidden += 1
            return
        ep = self.node.connect_endpoint(peer, "pub")
        if ep is None:
            return
        old = self._peer_eps.get(peer.node_id)
        self._peer_eps[peer.node_id] = ep
        self._connect(ep)
        moved = old is not None and old != ep
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
        if endpoint in self._connected:
            self._connected.discard(endpoint)
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
            self._maybe_commit(now)

    def _maybe_commit(self, now: float) -> None:
        if self.auto_commit and self._store is not None and now >= self._next_commit:
            self._next_commit = now + self.commit_interval_s
            self._commit_positions()

    def _drain_sub(self) -> None:
        sock = self._sock
        stats = self._stats
        trackers = self._trackers
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
                f = _zrecv(sock, _NOBLOCK, False)
            except zmq.Again:
                return
            b = f.bytes
            msg = [b]
            nb = len(b)
            while f.more:
                f = _zrecv(sock, _NOBLOCK, False)  # the rest of a message is already here
                b = f.bytes
                msg.append(b)
                nb += len(b)
            stats.messages += 1
            stats.bytes_in += nb
            budget -= nb
            try:
                stream, head, envs = decode_message(msg, max_event_size=maxsz)
            except UnsupportedVersion as exc:
                stats.bad_version += 1
                _log.warning("pubsub: dropped a message: %s", exc)
                continue
            except EventTooLarge as exc:
                stats.oversize += 1
                _log.warning("pubsub: dropped a message: %s", exc)
                continue
            except ProtocolError as exc:
                stats.bad_frames += 1
                _log.warning("pubsub: dropped a malformed message: %s", exc)
                continue
            if not self._matches(stream):
                continue  # SUB filtering is by prefix; an exact topic needs this check
            key = (head.publisher, stream)
            entry = trackers.get(key)
            if entry is None or entry[0] != head.epoch:
                entry = self._epoch_changed(key, entry, head, now)
                if entry is None:
                    continue
            tracker = entry[1]
            if head.kind == frames.KIND_DATA:
                if entry[0] == head.epoch and tracker.in_order(head.seq, head.count):
                    self._deliver(key, head.seq, envs)  # the common case: no Step, no copy
                else:
                    self._apply(key, tracker, tracker.on_live(head.seq, envs, now))
            else:
                stats.heartbeats += 1
                self._apply(key, tracker, tracker.on_heartbeat(head.seq, now))

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
            key = (peer_id, data.stream)
            entry = self._trackers.get(key)
            if entry is None:
                self._stats.bad_replies += 1
                continue
            tracker = entry[1]
            if data.error is not None:
                self._stats.replay_errors += 1
                if data.error in ("not_durable", "forbidden"):
                    tracker.replayable = False
                _log.info("pubsub: replay of %s refused: %s", key, data.error)
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
                _log.warning("pubsub: %s", gap)
            self._stats.epochs += 1
            # In order: positions before it stay under the old epoch until it is reached.
            ready.append((key, rewind_to if rewind_to is not None else -1,
                          _Mark(rewind_to, epoch, gap, self.on_gap == "error")))
        if step.skipped is not None:
            a, b = step.skipped
            reason = step.skip_reason
            gap = None
            self._stats.skipped += b - a
            _log.warning("pubsub: %s events %d..%d will not be delivered (%s)", key, a, b - 1,
                         reason)
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
            self._deliver(key, first, payloads)
        if step.ask is not None:
            self._send_ask(key, step.ask)

    def _deliver(self, key: Key, first: int, payloads: list[bytes]) -> None:
        """Decode a contiguous run of envelopes into the ready queue."""
        if self._verifier is not None:
            self._deliver_verified(key, first, payloads, self._verifier)
            return
        ready = self._ready
        maxsz = self.max_event_size
        seq = first
        for buf in payloads:
            try:
                ready.append((key, seq, decode(buf, maxsz)))
            except CodecError as exc:
                self._undecodable(key, seq, exc)
            seq += 1

    def _undecodable(self, key: Key, seq: int, exc: CodecError) -> None:
        # Logged but undecodable: a typed gap (counted), never a stall; the position passes
        # it only when iteration reaches it, never over events still waiting before it.
        self._stats.bad_events += 1
        _log.warning("pubsub: undecodable event %s #%d: %s", key, seq, exc)
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
        for buf in payloads:
            try:
                ev = decode(buf, maxsz)
            except CodecError as exc:
                self._undecodable(key, seq, exc)
                seq += 1
                continue
            try:
                verifier.verify(ev)
            except SignatureInvalid as exc:
                self._stats.bad_signatures += 1
                _log.warning("pubsub: event %s #%d refused: %s", key, seq, exc)
                # The cursor passes it in order, when iteration reaches it.
                ready.append((key, seq, _Mark(seq + 1, None, None)))
            else:
                ready.append((key, seq, ev))
            seq += 1

    def _send_ask(self, key: Key, ask: ReplayAsk) -> None:
        body = frames.ReplayRequest(self.sid, ask.req, key[1], ask.start, ask.from_time,
                                    ask.end, self.replay_chunk, self.replay_bytes, ask.epoch,
                                    self.max_event_size).to_body()
        try:
            self.node.send(key[0], frames.CTRL_REPLAY, body)
        except MeshError as exc:
            # Unreachable for now: the tracker re-sends after retry_s.
            _log.info("pubsub: replay request to %s not sent: %s", key[0], exc)

    # --- positions and commits -------------------------------------------------------------

    def _done(self, keep: int = 0) -> None:
        """Mark handed-out events processed, all but the last ``keep``."""
        handed = self._handed
        positions = self._positions
        while len(handed) > keep:
            key, seq = handed.popleft()
            positions[key] = seq + 1

    def _reach(self, key: Key, mark: _Mark) -> None:
        """Iteration reached a mark (every event before it is processed): apply it."""
        if mark.epoch is not None:
            self._pos_epoch[key] = mark.epoch
        if mark.pos is not None:
            self._positions[key] = mark.pos
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
        dirty = {k: (v, pe.get(k)) for k, v in self._positions.items()
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
                    self.node.send(pub, frames.CTRL_ACK,
                                   frames.Ack(self.durable or "", stream, pos).to_body())
                except MeshError:
                    pass  # the publisher learns it at the next commit

    def commit(self) -> None:
        """Commit the position past every event handed out so far (including the current one).

        Raises:
            StateError: the cursor store failed.
        """
        self.commit_upto(0)

    def commit_upto(self, keep: int) -> None:
        """Commit past every event handed out except the last ``keep`` (async buffering).

        Raises:
            StateError: the cursor store failed.
        """
        with self._lock:
            self._done(keep)
            self._commit_positions()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _recv_batch_async(self, timeout: float, max_events: int) -> list[Event]:
        """For AsyncSubscriber: a batch whose events stay 'handed out' (not done)."""
        with self._lock:
            if self._closed:
                return []
            # Called when the wrapper asks for more: what it handed out before is processed.
            self._done()
            deadline = time.monotonic() + timeout
            out: list[Event] = []
            ready = self._ready
            while not out:
                while not ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return []
                    self._pump(int(left * 1000) + 1)
                while ready and len(out) < max_events:
                    if ready[0][2].__class__ is _Mark and out:
                        break  # a mark applies once what is before it was processed
                    ev = self._take()
                    if ev is not None:
                        out.append(ev)
            return out

    # --- receiving -------------------------------------------------------------------------

    def _take(self) -> Event | None:
        """The next event of the ready queue, applying the marks before it (None: only
        marks were there). Raises a gap notice whose policy is "error"."""
        ready = self._ready
        while ready:
            key, seq, ev = ready.popleft()
            if isinstance(ev, _Mark):
                self._reach(key, ev)
                continue
            self._handed.append((key, seq))
            return ev
        return None

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (None: wait forever).

        Asking for the next event marks the previous one as processed (its position is
        committed at the next commit).

        Raises:
            ClosedError: the subscriber is closed.
            RetentionGap: with ``on_retention="error"``, events were deleted before delivery.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._done()
            if self._ready:
                # Draining a backlog (a replay) never waits on the socket, where the periodic
                # commit otherwise runs: commit here too, or a crash mid catch-up redoes it all.
                self._maybe_commit(time.monotonic())
            while True:
                while not self._ready:
                    wait = 100
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        wait = min(wait, int(left * 1000) + 1)
                    self._pump(wait)
                ev = self._take()
                if ev is not None:
                    return ev

    def recv_batch(self, timeout: float | None = None, max_events: int = 1000) -> list[Event]:
        """Up to ``max_events`` events (at least one unless ``timeout`` passed).

        All of them count as processed when the next call asks for more.

        Raises:
            ClosedError: the subscriber is closed.
            RetentionGap: as :meth:`recv` (events before the gap are returned first).
        """
        first = self.recv(timeout)
        if first is None:
            return []
        out = [first]
        with self._lock:
            ready = self._ready
            if not ready or max_events <= 1:
                return out
            # In bulk: every event but the last is processed once the next is taken, so only
            # the last stays "handed out" (what _done() + _take() per event would leave).
            self._done()
            positions = self._positions
            append = out.append
            last: tuple[Key, int] | None = None
            for _ in range(min(len(ready), max_events - 1)):
                item = ready[0]
                if item[2].__class__ is _Mark:
                    break  # applied by the next call, once what is before it is processed
                ready.popleft()
                if last is not None:
                    positions[last[0]] = last[1] + 1
                last = (item[0], item[1])
                append(item[2])  # type: ignore[arg-type]
            if last is not None:
                self._handed.append(last)
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
                    self._handed.clear()  # not processed: never committed, comes again
                raise
            self._processing.observe(started, False)
            with self._lock:
                self._done()

    # --- introspection / lifecycle ---------------------------------------------------------

    def stats(self) -> SubscriberStats:
        """Counters (summed over the streams) and the current lag."""
        with self._lock:
            s = SubscriberStats(**self._stats.__dict__)
            s.streams = len(self._trackers)
            for _, t in self._trackers.values():
                ts = t.stats
                s.delivered += ts.delivered
                s.duplicates += ts.duplicates
                s.gaps += ts.gaps
                s.buffered += ts.buffered
                s.buffer_dropped += ts.buffer_dropped
                s.replayed += ts.replayed
                s.replay_requests += ts.replay_requests
                s.replay_retries += ts.replay_retries
                s.lag += t.lag
            return s

    def positions(self) -> dict[Key, int]:
        """The position (next seq to process) per (publisher, stream) handed out so far."""
        with self._lock:
            return dict(self._positions)

    def close(self, unhanded: int = 0) -> None:
        """Commit (with auto commit), close the socket and the cursor store. Idempotent.

        Args:
            unhanded: the last N events handed out were not processed (async buffering).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._unmetrics()
            self._unsubscribe_peers()
            self._router.subs.pop(self.sid, None)
            if not self._router.subs:
                _registry.drop(self.node, "pubsub.sub", self._router)
            try:
                if self.auto_commit and self._store is not None:
                    self._done(unhanded)
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
                self._handed.clear()
        self.close()
