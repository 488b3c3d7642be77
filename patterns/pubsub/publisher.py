"""The publishing side: durable (logged) or best-effort streams on the node's data ROUTER.

One ROUTER data socket per node (role :data:`frames.DATA_ROLE`, pub/sub protocol 2) carries
every stream the node publishes; it is owned by a :class:`_PubHub` shared by the node's
publishers and guarded by one lock, because ``publish()`` runs on user threads while
heartbeats, subscription requests and replay reads run on the reactor thread. Each subscriber
connection asks for streams with a subscription request (permission-checked against the
connection's CURVE key, bounded by a per-connection, per-peer and node-wide :class:`Budget`)
and is then sent the matching DATA and HEARTBEAT messages, addressed by the routing id libzmq
gave that connection: no state a peer can make grow lives inside libzmq (an XPUB keeps every
distinct subscription of a connection, whatever its options).
Replay requests (``pubsub.replay``) are answered on the reactor thread straight from the log, one
bounded chunk per request: the subscriber asks for the next chunk when it has consumed one, so
neither side ever holds more than one chunk per (subscriber, stream). A peer that does not play
by that (asks again and again, never reads) is held to its replay byte budget
(:data:`REPLAY_PEER_BYTES`): a reply counts until a later request echoes its ``tok`` (proof the
peer read it and everything before it), and a peer over budget is answered ``"busy"``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from mesh.budget import Budget, LogLimiter
from mesh.envelope import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    NewEventEncoder,
    encode,
    encode_new,
    encode_new_many,
)
from mesh.errors import (
    ClosedError,
    CodecError,
    ConfigError,
    LogCorruptedRange,
    LogError,
    MeshError,
    OffsetOutOfRange,
    ProtocolError,
    ReplicationTimeout,
    SendFailed,
)
from mesh.log import LogConfig
from mesh.peers import PeerEventKind
from mesh.tracing import OTEL, child_fields, in_context, otel_active, span
from patterns._closing import close_with
from patterns._metrics import attach, publisher_collector, pubsub_hub_collector
from patterns.pubsub import _registry, frames
from patterns.pubsub.holdings import open_own_log

__all__ = ["Publisher", "PublisherStats"]

if TYPE_CHECKING:  # the signing module (and cryptography) loads only when used
    from mesh.security.signing import EventSigner

_log = logging.getLogger("zeromesh.pubsub")

#: Largest replay chunk the publisher sends, whatever the subscriber asks (records / bytes).
MAX_REPLAY_RECORDS = frames.REPLAY_MAX_RECORDS
MAX_REPLAY_BYTES = frames.REPLAY_MAX_BYTES
#: Replay bytes one peer (node id) may have outstanding: sent in replies it has not yet proven
#: read (see ReplayRequest.tok), and all peers together. A peer over it is answered
#: ``error="busy"`` with ``retry_ms``; a peer that never reads gets at most this much, ever.
REPLAY_PEER_BYTES = 32 << 20
REPLAY_NODE_BYTES = 128 << 20
#: What one reply costs in that budget beyond its envelopes (map, fields, frames): refusals
#: and empty replies cost it too, so a flood of small requests is bounded the same way.
REPLY_COST = 1024
#: A reply is cut to what the peer's budget has left; below this, the peer is told "busy".
REPLAY_MIN_CHUNK = 64 << 10
#: "busy": the subscriber asks again no sooner than this.
REPLAY_RETRY_MS = 500
#: Durable-subscriber positions (pubsub.ack: one per (peer, name) per stream) one peer may
#: hold, one stream may hold, and the node may hold. An ack beyond them is refused, counted.
ACK_POSITIONS_PER_PEER = 256
ACK_POSITIONS_PER_STREAM = 4096
ACK_POSITIONS_NODE = 16384
#: Envelopes per log batch in publish_many (one ``append_many``).
BATCH_EVENTS = 1000
#: Memory is bounded in bytes, not only in messages: libzmq's queues count messages (SNDHWM /
#: RCVHWM), so every DATA message is cut at DATA_MESSAGE_BYTES (envelopes plus FRAME_COST per
#: frame: libzmq's msg_t and content header; one event larger than that goes alone) and the
#: data sockets' HWM is DATA_HWM = QUEUE_BYTES / DATA_MESSAGE_BYTES messages, so one queue (the
#: publisher's per-subscriber pipe, the subscriber's receive pipe) holds at most QUEUE_BYTES
#: (32 MiB) while events are up to 32 KiB (one larger event is one message: then HWM x its
#: size). Beyond the HWM a PUB drops, and a durable subscriber replays from the log.
DATA_MESSAGE_BYTES = 32 << 10
FRAME_COST = 128
QUEUE_BYTES = 32 << 20
DATA_HWM = QUEUE_BYTES // DATA_MESSAGE_BYTES

# pyzmq's Socket.send/send_multipart wrappers cost ~3 µs per frame in Python (argument checks,
# enum flag arithmetic); the backend method with int flags costs a fraction of that, and a DATA
# message is at least 3 frames (measured: 13 µs -> 2-4 µs per 3-frame message). The node's
# sockets are zmq.Socket subclasses that only override connect(), so this is the same send.
_zsend: Any = zmq.backend.Socket.send
#: Coalescing of consecutive publish() calls: a call within COALESCE_GAP_S of the stream's last
#: send is held (at most ``linger_s``, at most COALESCE_MAX events, at most one DATA message's
#: worth: DATA_MESSAGE_BYTES counted as send_data counts it, envelopes plus FRAME_COST each)
#: and goes out with the following ones as one DATA message. A held batch is sent when the
#: next event would not fit in that message (the event starts the next batch), so a stream
#: published at full speed goes out in full messages (about 100 events of 100 B: per-message
#: costs on both sides, the subscriber's wake-ups most, are what small messages pay for). At a
#: moderate rate every event goes out at once.
COALESCE_GAP_S = 100e-6
#: The most events a held batch can reach (each counts at least FRAME_COST): the byte bound
#: implies it, so publish() does not count events.
COALESCE_MAX = DATA_MESSAGE_BYTES // FRAME_COST
#: The longest interval between heartbeats of a stream whose head does not move.
IDLE_BEAT_MAX_S = 10.0
#: Subscription budgets (docs/protocol.md, "Budgets"): subscriptions one connection may hold
#: (a Subscriber holds one per connection), one peer may hold over all its connections (its
#: CURVE key; in plaintext its source address), and the node may hold in all.
MAX_SUBS_PER_CONN = 16
MAX_SUBS_PER_PEER = 1024
MAX_SUBS = 16384
#: Subscription requests read per reactor turn (the rest wait for the next turn).
SUB_DRAIN = 512
#: The data ROUTER's receive side carries only subscription requests: small and few.
SUB_MAX_MESSAGE = 1024
SUB_RCVHWM = 64
#: Every connection holding a subscription is probed (a PING) at least this often, so the
#: subscriptions of a connection that went away are returned within about this long.
PROBE_S = 2.0
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_EHOSTUNREACH = errno.EHOSTUNREACH

if OTEL:  # optional: a "publish <stream>" span around publish()/publish_many()
    from opentelemetry import trace as _otel_trace  # type: ignore[import-not-found,unused-ignore]
#: The API's global provider slot, which otel_active() reads, exists: publish() tests it for
#: None (no provider set: spans cannot record) before calling otel_active().
_OTEL_SLOT = OTEL and hasattr(_otel_trace, "_TRACER_PROVIDER")

#: True inside the span publish() opened: the inner call publishes instead of opening another.
_in_publish_span: ContextVar[bool] = ContextVar("zeromesh_publish_span", default=False)
#: Set by :class:`~patterns.pubsub.aio.AsyncPublisher` around a publish call: the call logs
#: and sends, and the caller awaits the stores itself (so a cancelled await has published).
_no_replica_wait: ContextVar[bool] = ContextVar("zeromesh_no_replica_wait", default=False)


def _otel_publish_span() -> bool:
    """Open a publish span: spans record (:func:`mesh.tracing.otel_active`) and this is not
    the call a span already wraps."""
    return otel_active() and not _in_publish_span.get()


def _span_traceparent() -> str | None:
    """The current (publish) span as a traceparent, when it records; else None."""
    cur = _otel_trace.get_current_span()
    sc = cur.get_span_context()
    if not sc.is_valid or not cur.is_recording():
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


@dataclass
class PublisherStats:
    """A snapshot of one publisher's counters.

    Attributes:
        stream: the stream name.
        durable: events are logged (replayable).
        head: the next seq to be assigned.
        oldest: the first seq the log still holds (``head`` when empty or best-effort).
        published: events published through this object.
        messages: DATA messages sent (a batch is one message).
        bytes_out: bytes of the DATA messages sent (all frames; heartbeats not counted).
        replay_requests: replay requests answered for this stream.
        replay_events: events sent in replay chunks.
        replay_gone: requests that asked below ``oldest`` (retention).
        replay_truncated: requests whose position this log no longer agrees with (a lost
            tail, a restored or wiped log: a new epoch); answered from the divergence point.
        replay_skipped: seqs answered as skipped (damaged in the log, or over the asking
            subscriber's ``max_event_size``).
        epoch: the writer epoch of the stream (durable: the log's; best-effort: random).
        bad_requests: malformed / wrong-version replay or ack bodies (node-wide).
        replay_busy: replay requests answered ``"busy"`` (node-wide): the asking peer was
            over its replay byte budget or its connection was backed up.
        replay_dropped: replay requests not answered at all (node-wide): the peer's budget
            could not even hold the refusal.
        replay_bytes_held: replay bytes sent and not yet proven read (node-wide).
        acks_refused: acks refused (node-wide): the peer may not subscribe the stream, or
            the positions budget (per peer, per stream, node) was full.
        subscribers: subscriber connections this stream is sent to now.
        subscriptions_refused: subscription requests refused (node-wide: forbidden, over
            budget or malformed; each answered with a REFUSED notice).
        subscriptions_malformed: of those, requests that did not decode (node-wide).
        subscriptions_held: subscriptions the node's data socket holds now (node-wide).
        positions: durable subscription name -> committed position (next seq it will process).
        lag: durable subscription name -> ``head - position``.
        replicated: store node id -> the seq it holds this stream durably up to (one past
            the last; acked under the current epoch: patterns/pubsub/store.py).
    """

    stream: str
    durable: bool
    head: int
    oldest: int
    published: int = 0
    messages: int = 0
    bytes_out: int = 0
    replay_requests: int = 0
    replay_events: int = 0
    replay_gone: int = 0
    replay_truncated: int = 0
    replay_skipped: int = 0
    epoch: int = 0
    bad_requests: int = 0
    replay_busy: int = 0
    replay_dropped: int = 0
    replay_bytes_held: int = 0
    acks_refused: int = 0
    subscribers: int = 0
    subscriptions_refused: int = 0
    subscriptions_malformed: int = 0
    subscriptions_held: int = 0
    positions: dict[str, int] = field(default_factory=dict)
    lag: dict[str, int] = field(default_factory=dict)
    replicated: dict[str, int] = field(default_factory=dict)


#: Stores whose replication acks one stream keeps (patterns/pubsub/store.py).
MAX_REPLICAS_PER_STREAM = 64


class _Stream:
    """Per-stream state inside the hub (guarded by the hub's lock)."""

    def __init__(self, name: str, durable: bool, log: Any, epoch: int) -> None:
        self.name = name
        self.topic = name.encode()
        self.durable = durable
        self.log = log
        self.epoch = epoch
        self.next_seq = log.next_offset if log is not None else 0
        self.stats = PublisherStats(name, durable, self.next_seq, self.next_seq, epoch=epoch)
        self.positions: dict[tuple[str, str], int] = {}  # (peer id, name) -> position
        self.linger_s = 0.0
        self.pending: list[bytes] = []  # logged, not sent yet (coalescing)
        self.pending_bytes = 0  # their size as send_data counts it (envelopes + FRAME_COST)
        self.pending_first = 0
        self.pending_since = 0.0
        self.last_send = 0.0
        self.timer_armed = False
        self.beat_head = -1  # the head the last heartbeat announced
        self.beat_gap = 0.0  # the current interval between this stream's heartbeats
        self.beat_due = 0.0  # monotonic time of its next heartbeat
        self.rids: list[bytes] = []  # routing ids of the connections subscribed to it
        self.replicas: dict[str, int] = {}  # store node id -> seq it holds up to (acked)


class _Conn:
    """One subscriber connection on the data ROUTER that holds subscriptions (hub lock)."""

    __slots__ = ("key", "packed", "peer", "rid", "subs")

    def __init__(self, rid: bytes, peer: str | None, key: object) -> None:
        self.rid = rid
        self.peer = peer  # the node id its CURVE key proves (None: plaintext / unknown)
        self.key = key  # the per-peer budget key: its CURVE key, else its source address
        self.subs: set[tuple[str, bool]] = set()  # (topic, prefix)
        # Its latest subscription request asked for packed DATA (pub/sub 2.4; a 2.3
        # subscriber never does and gets one frame per envelope).
        self.packed = False

    def wants(self, stream: str) -> bool:
        return any(stream.startswith(t) if p else stream == t for t, p in self.subs)


class _PubHub:
    """The node's data ROUTER, its lock, subscriptions, heartbeats, replay/ack handlers."""

    def __init__(self, node: Any, *, heartbeat_s: float, sndhwm: int,
                 forget_after_s: float = 24 * 3600.0) -> None:
        self.node = node
        self.heartbeat_s = heartbeat_s
        # An idle stream (head unchanged) beats less and less often, up to this: what its
        # subscribers need is one beat after the last DATA (a lost tail shows at once), not
        # one per heartbeat_s forever (10,000 idle streams were 20,000 sends a second).
        self.idle_beat_s = max(heartbeat_s, min(IDLE_BEAT_MAX_S, 20 * heartbeat_s))
        self.forget_after_s = forget_after_s
        self.left: dict[str, float] = {}  # peer id -> monotonic time it left
        self.lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}
        self.bad_requests = 0
        self.pub_id = frames.node_id_bytes(node.id)
        sock = node.socket(zmq.ROUTER, frames.DATA_ROLE)
        # Per subscriber connection: at most DATA_HWM messages of DATA_MESSAGE_BYTES queued.
        sock.setsockopt(zmq.SNDHWM, min(sndhwm, DATA_HWM))
        sock.setsockopt(zmq.LINGER, 0)
        # A full connection raises EAGAIN (dropped: PUB semantics), a gone one EHOSTUNREACH
        # (its subscriptions are returned). No ROUTER_HANDOVER: a routing id is the one libzmq
        # gave the connection, never one a peer claims.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, SUB_MAX_MESSAGE)
        sock.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
        self.secure = getattr(node, "security", None) is not None
        self.sock = sock
        self.endpoints = node.bind(sock, frames.DATA_ROLE)
        self.conns: dict[bytes, _Conn] = {}
        #: routing ids of the connections that asked for packed DATA (a subset of conns)
        self.packed: set[bytes] = set()
        self.sub_conn = Budget("subscriptions", MAX_SUBS_PER_CONN, MAX_SUBS)
        self.sub_peer = Budget("subscriptions_peer", MAX_SUBS_PER_PEER, MAX_SUBS)
        self.subscriptions = 0  # subscription requests admitted (mesh pub --wait reads it)
        self.refused_subscriptions = 0
        self.bad_subscriptions = 0
        self.refused_replays = 0
        # Replay bytes sent per peer and not proven read: peer -> {tok: bytes}, oldest first
        # (reactor thread only). A request echoing tok proves that reply and every earlier
        # one left our queues (one ordered connection), so they are returned to the budget.
        self.replay_budget = Budget("replay_bytes", REPLAY_PEER_BYTES, REPLAY_NODE_BYTES)
        self.replay_sent: dict[str, OrderedDict[int, int]] = {}
        self.replay_busy = 0
        self.replay_dropped = 0
        # Ack positions: per peer (node-wide cap) and per stream (written under the lock).
        self.ack_peer_budget = Budget("ack_positions", ACK_POSITIONS_PER_PEER,
                                      ACK_POSITIONS_NODE)
        self.ack_stream_budget = Budget("ack_positions_stream", ACK_POSITIONS_PER_STREAM,
                                        ACK_POSITIONS_NODE)
        self.acks_refused = 0
        self._acks: list[tuple[str, object]] = []  # received, applied at the end of the turn
        self.logs = LogLimiter(_log)
        self.conns_dropped = 0
        self._next_probe = 0.0
        node.handle(frames.CTRL_REPLAY, self._on_replay)
        node.handle(frames.CTRL_ACK, self._on_ack)
        node.handle(frames.CTRL_REPLICATED, self._on_replicated)
        self.repl_cond = threading.Condition()
        #: Called (reactor thread, or a closing thread) whenever a replication ack moved or a
        #: publisher closed: how an asyncio waiter is woken without a thread of its own.
        self.repl_watchers: set[Callable[[], None]] = set()
        self.replicated_refused = 0
        self.timer = node.reactor.call_every(heartbeat_s, self._beat)
        self._unpeer = node.on_peer(self._on_peer)
        self.users = 0
        # Subscription requests are read on the reactor thread as they come: the reactor
        # polls the socket's signalling fd (never the socket itself, which user threads send
        # on) and reads under the lock; a signal another thread's send consumed is caught up
        # at the next beat.
        self.fd = sock.getsockopt(zmq.FD)
        node.reactor.call_soon(node.reactor.add_reader, self.fd, self._on_readable)
        self._unmetrics = attach(node, pubsub_hub_collector(self))

    # -- user threads -----------------------------------------------------------------------

    def close(self) -> None:
        self.timer.cancel()
        self._unpeer()
        self._unmetrics()
        # The next hub binds new endpoints: stop announcing these so subscribers move there.
        try:
            self.node.unbind(frames.DATA_ROLE, self.endpoints)
        except MeshError:
            pass
        reactor = self.node.reactor
        if reactor.in_reactor_thread():
            reactor.remove_reader(self.fd)
        else:
            try:  # the fd must leave the reactor's poll set before the socket closes it
                reactor.run_sync(reactor.remove_reader, self.fd)
            except (ClosedError, MeshError, RuntimeError):
                pass  # the reactor is stopped or stopping: it polls nothing any more
        with self.lock:
            self.sock.close(linger=0)

    def _on_peer(self, ev: Any) -> None:
        # Reactor thread. Positions of subscribers whose node left and stayed away
        # forget_after_s are dropped at a beat (their log retention floors have their own TTL).
        if ev.kind is PeerEventKind.LEFT:
            self.left[ev.peer.node_id] = time.monotonic()
            # Its connection is closed: nothing sent to it is held any more.
            self.replay_sent.pop(ev.peer.node_id, None)
            self.replay_budget.drop(ev.peer.node_id)
        else:
            self.left.pop(ev.peer.node_id, None)

    # -- reactor thread ---------------------------------------------------------------------

    def send_data(self, st: _Stream, first: int, envs: list[bytes],
                  cost: int | None = None) -> None:
        """Send ``envs`` (seqs from ``first``) as DATA messages of at most
        :data:`DATA_MESSAGE_BYTES` each (under ``lock``) to every connection subscribed to the
        stream. PUB semantics: a connection at its HWM misses the message, never blocks; the
        subscriber notices the hole and replays it from the log.

        ``cost``: their size as counted here (envelopes plus FRAME_COST each), when the caller
        knows it (a held batch).

        Raises:
            ClosedError: the socket failed.
        """
        n = len(envs)
        if n > 1 and (sum(map(len, envs)) + n * FRAME_COST if cost is None else cost) \
                > DATA_MESSAGE_BYTES:
            i = 0
            while i < n:
                j, nb = i + 1, len(envs[i]) + FRAME_COST  # one event always fits
                while j < n and nb + len(envs[j]) + FRAME_COST <= DATA_MESSAGE_BYTES:
                    nb += len(envs[j]) + FRAME_COST
                    j += 1
                self._send_message(st, first + i, envs[i:j])
                i = j
            return
        self._send_message(st, first, envs)

    def _send_message(self, st: _Stream, first: int, envs: list[bytes]) -> None:
        # One DATA message (one multipart) per subscribed connection: routing id, topic,
        # header, then one frame per envelope, or (a connection that asked for it, pub/sub
        # 2.4) one frame with them all: three pyzmq calls per message on each side instead
        # of one per event. Both layouts carry the same seqs, cut at the same places.
        sock = self.sock
        if sock.closed:
            raise ClosedError("publisher socket is closed")
        n = len(envs)
        topic = st.topic
        packed = self.packed
        header: bytes | None = None
        pheader: bytes | None = None
        blob = b""
        gone = None
        for rid in st.rids:
            try:
                _zsend(sock, rid, _MORE)
            except zmq.Again:
                continue  # this connection is at its HWM: it misses the message
            except zmq.ZMQError as exc:
                if exc.errno == _EHOSTUNREACH:
                    gone = [rid] if gone is None else [*gone, rid]
                    continue
                raise ClosedError(f"publisher socket failed: {exc}") from exc
            try:
                _zsend(sock, topic, _MORE)
                if rid in packed:
                    if pheader is None:
                        pheader = frames.data_header(self.pub_id, st.epoch, first, n,
                                                     st.durable, packed=True)
                        blob = envs[0] if n == 1 else b"".join(envs)
                    _zsend(sock, pheader, _MORE)
                    _zsend(sock, blob, _LAST, len(blob) <= 4096)  # zero-copy for big ones
                    continue
                if header is None:
                    header = frames.data_header(self.pub_id, st.epoch, first, n, st.durable)
                _zsend(sock, header, _MORE)
                copy = len(envs[0]) <= 4096  # zero-copy only pays for big frames
                for i in range(n - 1):
                    _zsend(sock, envs[i], _MORE, copy)
                _zsend(sock, envs[n - 1], _LAST, copy)
            except zmq.ZMQError as exc:
                raise ClosedError(f"publisher socket failed: {exc}") from exc
        if gone is not None:
            for rid in gone:
                self._drop_conn(rid)
        st.stats.bytes_out += len(topic) + frames.HEADER.size + (
            len(blob) if blob else sum(map(len, envs)))
        st.last_send = time.monotonic()
        st.stats.messages += 1

    def flush(self, st: _Stream) -> None:
        """Send the stream's held events now (under ``lock``), before anything after them.

        Raises:
            ClosedError: the socket failed.
        """
        pend = st.pending
        if pend:
            st.pending = []
            self.send_data(st, st.pending_first, pend, st.pending_bytes)

    def _flush_later(self, st: _Stream) -> None:
        # Reactor thread: the linger of held events may have run out. Events held for less
        # (a batch begun after the one this timer was armed for went out full) wait for
        # their own due time: the timer re-arms itself from here, so a stream kept busy has
        # one timer running (a wake-up per linger_s at most) instead of the publishing
        # thread arming one through the reactor's queue for every batch it holds.
        with self.lock:
            if self.sock.closed or self.streams.get(st.name) is not st:
                st.timer_armed = False
                return
            if st.pending:
                wait = st.pending_since + st.linger_s - time.monotonic()
                if wait > 0:
                    try:
                        self.node.reactor.call_later(wait, self._flush_later, st)
                        return
                    except ClosedError:
                        pass  # the node is closing: send them now
                try:
                    self.flush(st)
                except ClosedError as exc:
                    _log.warning("pubsub: held events of %s not sent: %s", st.name, exc)
            st.timer_armed = False

    def _send_control(self, rid: bytes, msg: list[bytes]) -> bool:
        """Under ``lock``: one heartbeat / notice to one connection; False when it is gone
        (its subscriptions are returned then). A full connection just misses it."""
        sock = self.sock
        try:
            _zsend(sock, rid, _MORE)
        except zmq.Again:
            return True
        except zmq.ZMQError as exc:
            if exc.errno == _EHOSTUNREACH:
                self._drop_conn(rid)
                return False
            raise
        for f in msg[:-1]:
            _zsend(sock, f, _MORE)
        _zsend(sock, msg[-1], _LAST)
        return True

    def _beat(self) -> None:
        with self.lock:
            if self.sock.closed:
                return
            try:
                self._drain_requests()  # a wake-up another thread's send consumed
                self._beat_locked()
            except zmq.ZMQError as exc:
                self.logs.warning("beat", "pubsub: data socket failed at a beat: %s", exc)

    def _beat_locked(self) -> None:
        now = time.monotonic()
        base, cap = self.heartbeat_s, self.idle_beat_s
        for st in self.streams.values():
            if st.pending:
                try:
                    # Held events first: a head beyond what was sent would look like a hole.
                    self.flush(st)
                except ClosedError:
                    return
            head = st.next_seq
            if head != st.beat_head:
                st.beat_head, st.beat_gap = head, base  # busy: every beat
            elif now < st.beat_due:
                continue
            else:
                st.beat_gap = min(st.beat_gap * 2, cap)  # idle: back off
            st.beat_due = now + st.beat_gap - 0.001
            if st.rids:
                beat = frames.encode_heartbeat(st.topic, self.pub_id, st.epoch, head,
                                               st.durable)
                for rid in list(st.rids):
                    self._send_control(rid, beat)
        if self.conns and now >= self._next_probe:
            # Connections that went away answer EHOSTUNREACH: their subscriptions go back.
            self._next_probe = now + PROBE_S
            ping = frames.encode_ping(self.pub_id)
            for rid in list(self.conns):
                self._send_control(rid, ping)
        if self.left:
            self._forget_left(now)

    def _forget_left(self, now: float) -> None:
        # Under lock, at a beat: drop the positions (lag rows) of subscribers gone too long.
        for peer, since in list(self.left.items()):
            if now - since < self.forget_after_s:
                continue
            del self.left[peer]
            for st in self.streams.values():
                for k in [k for k in st.positions if k[0] == peer]:
                    del st.positions[k]
                    self.ack_stream_budget.give(st.name)
            self.ack_peer_budget.drop(peer)

    # -- subscriptions (reactor thread, under lock) -------------------------------------------

    def _on_readable(self, _fd: object) -> None:
        with self.lock:
            if self.sock.closed:
                return
            try:
                more = self._drain_requests()
            except zmq.ZMQError as exc:
                self.logs.warning("recv", "pubsub: data socket failed: %s", exc)
                return
        if more:
            self.node.reactor.call_soon(self._on_readable, None)  # after other work

    def _drain_requests(self) -> bool:
        """Read up to :data:`SUB_DRAIN` subscription requests; True when more may wait."""
        sock = self.sock
        for _ in range(SUB_DRAIN):
            try:
                first = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            parts = [first]
            while parts[-1].more and len(parts) < 4:
                parts.append(sock.recv(zmq.NOBLOCK, copy=False))
            if parts[-1].more:  # a request has 2 frames after the routing id: drop the rest
                while sock.recv(zmq.NOBLOCK, copy=False).more:
                    pass
            self._on_request(parts)
        return True

    def _on_request(self, parts: list[zmq.Frame]) -> None:
        rid = parts[0].bytes
        conn = self.conns.get(rid)
        if conn is None:
            uid: object = None
            if self.secure:
                try:
                    uid = parts[-1].get("User-Id")
                except zmq.ZMQError:
                    uid = None
            peer = self.node.peer_by_key(uid if isinstance(uid, str) else None) \
                if self.secure else None
            if self.secure:
                key: object = uid if isinstance(uid, str) else None
            else:
                try:
                    key = parts[-1].get("Peer-Address")
                except zmq.ZMQError:
                    key = ""
            conn = _Conn(rid, peer, key)
        who = conn.peer or conn.key or "?"
        raw_topic = parts[2].bytes[:frames.MAX_TOPIC] if len(parts) > 2 else b""
        try:
            op, topic, prefix, packed = frames.decode_subscription([p.bytes for p in parts[1:]])
        except (ProtocolError, CodecError) as exc:
            self.bad_subscriptions += 1
            self._refuse(conn, raw_topic, frames.REFUSED_MALFORMED)
            self.logs.warning(f"bad:{who}", "pubsub: bad subscription request from %s: %s",
                              who, exc)
            return
        item = (topic, prefix)
        if op == frames.OP_SUBSCRIBE and packed != conn.packed:
            # The layout the connection asked for last (it is FIFO: DATA sent after this
            # request is read after the subscriber sent it).
            conn.packed = packed
            if packed and rid in self.conns:
                self.packed.add(rid)
            else:
                self.packed.discard(rid)
        if op == frames.OP_UNSUBSCRIBE:
            if item in conn.subs:
                conn.subs.discard(item)
                self.sub_conn.give(rid)
                self.sub_peer.give(conn.key)
                self._restream(conn, item)
                if not conn.subs:
                    self.conns.pop(rid, None)
                    self.packed.discard(rid)
            return
        if item in conn.subs:
            # A repeat (the subscriber's periodic request): it has the heads already, and a
            # prefix over thousands of streams must not cost a heartbeat each every 5 s.
            return
        if self.secure and (conn.peer is None
                            or not self.node.permits(conn.peer, "subscribe", topic)):
            self._refuse(conn, raw_topic, frames.REFUSED_FORBIDDEN)
            self.logs.warning(f"forbidden:{who}", "pubsub: subscription %r from %s refused",
                              topic[:64], who)
            return
        if not self.sub_conn.take(rid):
            self._refuse(conn, raw_topic, frames.REFUSED_BUDGET)
            self.logs.warning(f"budget:{who}", "pubsub: subscription %r from %s over the "
                              "per-connection or node budget", topic[:64], who)
            return
        if not self.sub_peer.take(conn.key):
            self.sub_conn.give(rid)
            self._refuse(conn, raw_topic, frames.REFUSED_BUDGET)
            self.logs.warning(f"budget:{who}", "pubsub: subscription %r from %s over the "
                              "per-peer budget", topic[:64], who)
            return
        conn.subs.add(item)
        self.conns[rid] = conn
        if conn.packed:
            self.packed.add(rid)
        self.subscriptions += 1
        self._restream(conn, item)
        self._announce(conn, item)

    def _refuse(self, conn: _Conn, topic: bytes, reason: int) -> None:
        self.refused_subscriptions += 1
        self._send_control(conn.rid, frames.encode_refused(topic, self.pub_id, reason))

    def _may_send(self, conn: _Conn, st: _Stream) -> bool:
        """The connection asked for the stream and (secure) its key may subscribe to it."""
        if not conn.wants(st.name):
            return False
        if self.secure and conn.peer is None:
            return False
        return not self.secure or self.node.permits(conn.peer, "subscribe", st.name)

    def _covered(self, item: tuple[str, bool]) -> list[_Stream]:
        """The streams a subscription covers (an exact one: a lookup, not a scan)."""
        topic, prefix = item
        if not prefix:
            st = self.streams.get(topic)
            return [] if st is None else [st]
        return [st for name, st in self.streams.items() if name.startswith(topic)]

    def _restream(self, conn: _Conn, item: tuple[str, bool]) -> None:
        """Recompute which of the streams ``item`` covers go to ``conn`` after it was added
        to or removed from the connection's subscriptions (the others are unchanged)."""
        rid = conn.rid
        for st in self._covered(item):
            want = bool(conn.subs) and self._may_send(conn, st)
            has = rid in st.rids
            if want and not has:
                st.rids = [*st.rids, rid]  # a new list: a send loop never sees it change
            elif has and not want:
                st.rids = [r for r in st.rids if r != rid]

    def add_stream(self, st: _Stream) -> None:
        """Under lock: a new stream goes to every connection already subscribed to it."""
        self.streams[st.name] = st
        st.rids = [c.rid for c in self.conns.values() if self._may_send(c, st)]

    def _announce(self, conn: _Conn, item: tuple[str, bool]) -> None:
        """A new subscription hears the head of each stream it covers at once (held events of
        the stream go out first)."""
        for st in self._covered(item):
            if conn.rid not in st.rids:
                continue
            if st.pending:
                self.flush(st)
            if not self._send_control(conn.rid, frames.encode_heartbeat(
                    st.topic, self.pub_id, st.epoch, st.next_seq, st.durable)):
                return

    def _drop_conn(self, rid: bytes) -> None:
        """A connection went away (EHOSTUNREACH): return its subscriptions."""
        conn = self.conns.pop(rid, None)
        self.packed.discard(rid)
        if conn is None:
            return
        self.conns_dropped += 1
        n = len(conn.subs)
        self.sub_conn.drop(rid)
        self.sub_peer.give(conn.key, n)
        for st in self.streams.values():
            if rid in st.rids:
                st.rids = [r for r in st.rids if r != rid]

    def budget_stats(self) -> dict[str, int]:
        """The subscription budgets' counters (under lock)."""
        out = {**self.sub_conn.stats(), **self.sub_peer.stats()}
        out["subscriptions_refused"] = self.refused_subscriptions
        out["subscriptions_refused_by_budget"] = self.sub_conn.refused + self.sub_peer.refused
        out["subscriptions_malformed"] = self.bad_subscriptions
        out["subscriber_connections"] = len(self.conns)
        return out

    def _on_replay(self, peer_id: str, body: object) -> None:
        # Reactor thread. Every reply costs the asking peer's replay budget (its envelopes
        # plus REPLY_COST) until a later request proves it read (tok); see _PubHub.__init__.
        malformed: tuple[str, int, str] | None = None
        try:
            rq = frames.decode_replay_request(body)
        except (ProtocolError, CodecError) as exc:
            self.bad_requests += 1
            self.logs.warning("bad_replay", "pubsub: bad replay request from %s: %s",
                              peer_id, exc)
            # Answer a request we can route back (sid, req, stream usable) with a typed
            # refusal: the subscriber sees why instead of retrying it every retry_s forever.
            malformed = frames.replay_reply_target(body)
            if malformed is None:
                return
            rq = frames.ReplayRequest(malformed[0], malformed[1], malformed[2], 0, None, None,
                                      1, 1)
        budget = self.replay_budget
        sent = self.replay_sent.get(peer_id)
        if sent is not None:
            budget.give_through(peer_id, sent, rq.tok)  # that reply and every one before it were read
        room = budget.room(peer_id)
        if malformed is not None:
            reply = frames.ReplayData(rq.sid, rq.req, rq.stream, 0, [], 0, 0, False,
                                      frames.REPLAY_ERROR_MALFORMED)
        elif not self.node.permits(peer_id, "replay", rq.stream):
            self.refused_replays += 1
            reply = frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], 0, 0, False,
                                      "forbidden")
        elif room - REPLY_COST < REPLAY_MIN_CHUNK or self.node.backlogged(peer_id):
            # Over its budget, or it does not read what we send: refuse (typed, cheap);
            # the subscriber asks again after retry_ms, with backoff.
            budget.refused += 1
            reply = frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], 0, 0, False,
                                      "busy", retry_ms=REPLAY_RETRY_MS)
        else:
            if rq.max_bytes > room - REPLY_COST:
                rq = dataclasses.replace(rq, max_bytes=room - REPLY_COST)
            reply = self._serve(rq)
        cost = REPLY_COST + sum(map(len, reply.events))
        if not budget.take(peer_id, cost):
            # Not even a refusal fits: no answer (the subscriber's retry_s covers it).
            self.replay_dropped += 1
            self.logs.warning("replay_dropped", "pubsub: replay budget of %s full: request "
                              "not answered", peer_id)
            return
        if reply.error == "busy":  # counted once a request is answered busy, not dropped
            self.replay_busy += 1
        tok = secrets.randbits(63)
        if sent is None:
            sent = self.replay_sent[peer_id] = OrderedDict()
        sent[tok] = cost
        reply = dataclasses.replace(reply, tok=tok)
        try:
            self.node.send(peer_id, frames.CTRL_REPLAY_DATA, reply.to_body())
        except MeshError as exc:
            del sent[tok]
            budget.give(peer_id, cost)
            self.logs.log(logging.INFO, "replay_unsent", "pubsub: replay reply to %s not "
                          "sent: %s", peer_id, exc)

    def _serve(self, rq: frames.ReplayRequest) -> frames.ReplayData:
        st = self.streams.get(rq.stream)
        if st is None or not st.durable:
            err = "unknown_stream" if st is None else "not_durable"
            head = st.next_seq if st is not None else 0
            return frames.ReplayData(rq.sid, rq.req, rq.stream, rq.start or 0, [], head, head,
                                     False, err, st.epoch if st is not None else 0)
        log = st.log
        st.stats.replay_requests += 1
        head = st.next_seq
        epoch = st.epoch
        first_kept = log.first_offset
        oldest = head if first_kept is None else first_kept
        try:
            start = rq.start if rq.start is not None else log.offset_for_time(rq.from_time)
        except LogError as exc:
            return frames.ReplayData(rq.sid, rq.req, rq.stream, 0, [], head, oldest, False,
                                     f"log_error: {exc}", epoch)
        truncate = None
        epoch_end = None
        if rq.epoch is not None and rq.epoch != epoch:
            epoch_end = log.epochs.end_of(rq.epoch)
        if rq.start is not None and rq.epoch is not None:
            # Does the subscriber's view up to `start` (seen under rq.epoch) still hold? After
            # a lost tail, a wiped or restored log, answer from where it stops holding.
            d = log.epochs.divergence(rq.epoch, min(rq.start, head))
            if rq.start > head:
                d = min(d, head)  # it saw seqs this log never (or no longer) assigned
            if d < rq.start:
                truncate = start = d
                st.stats.replay_truncated += 1
        gone = start < oldest
        if gone:
            st.stats.replay_gone += 1
            start = oldest
        end = head if rq.end is None or truncate is not None else min(rq.end, head)
        n = min(rq.max_records, MAX_REPLAY_RECORDS, max(0, end - start))
        events: list[bytes] = []
        first = start
        skip: tuple[int, int, str] | None = None
        if n:
            try:
                first, events = self._read(log, start, n)
            except OffsetOutOfRange as exc:
                # Retention ran between our check and the read: report it the same way.
                gone = True
                oldest = exc.first if exc.first is not None else head
                first, events = oldest, []
            except LogCorruptedRange as exc:
                # Unreadable records (damage, a deleted segment): never stall the subscriber
                # on them; say which seqs will never come, and go on after them.
                nxt = exc.next_offset if exc.next_offset is not None else head
                skip = (start, max(nxt, start + 1), "damaged")
                first = skip[1]
            except LogError as exc:
                return frames.ReplayData(rq.sid, rq.req, rq.stream, start, [], head, oldest,
                                         gone, f"log_error: {exc}", epoch)
            first, skip = frames.trim_chunk(events, first, min(rq.max_bytes, MAX_REPLAY_BYTES),
                                            rq.max_event, skip)
        if skip is not None:
            st.stats.replay_skipped += skip[1] - skip[0]
        st.stats.replay_events += len(events)
        return frames.ReplayData(rq.sid, rq.req, rq.stream, first, events, head, oldest, gone,
                                 None, epoch, truncate, skip, epoch_end)

    @staticmethod
    def _read(log: Any, start: int, n: int) -> tuple[int, list[bytes]]:
        """Contiguous payloads from ``start``. Under ``corruption="skip"`` the log may skip a
        damaged range inside one read; a replay chunk must stay contiguous, so a skip there
        ends the chunk (and a skip at its start is raised as the damage it is)."""
        if log.config.corruption != "skip":
            return log.read_batch_payloads(start, n)  # type: ignore[no-any-return]
        recs = log.read(start, n)
        if recs and recs[0].offset > start:
            raise LogCorruptedRange(log.path, 0, "damaged records skipped", offset=start,
                                    next_offset=recs[0].offset)
        out = []
        for i, r in enumerate(recs):
            if r.offset != start + i:
                break
            out.append(r.payload)
        return start, out

    def _on_ack(self, peer_id: str, body: object) -> None:
        # Reactor thread. Acks arrive many per multipart; they are applied together, after
        # the node dispatched the whole multipart, under one hold of the lock (stats() and
        # scrapes on other threads take it too: one acquisition per ack let a scraping loop
        # starve the reactor, 5,000 acks took 40 s under CURVE).
        self._acks.append((peer_id, body))
        if len(self._acks) == 1:
            self.node.reactor.call_soon(self._apply_acks)

    def _apply_acks(self) -> None:
        # Only a peer allowed to subscribe the stream may ack it, and a new (peer, name)
        # needs room in the per-peer and per-stream budgets.
        batch, self._acks = self._acks, []
        allowed: dict[tuple[str, str], bool] = {}
        acks: list[tuple[str, frames.Ack]] = []
        for peer_id, body in batch:
            try:
                ack = frames.decode_ack(body)
            except (ProtocolError, CodecError) as exc:
                self.bad_requests += 1
                self.logs.warning("bad_ack", "pubsub: bad ack from %s: %s", peer_id, exc)
                continue
            ok = allowed.get((peer_id, ack.stream))
            if ok is None:
                ok = allowed[(peer_id, ack.stream)] = self.node.permits(
                    peer_id, "subscribe", ack.stream)
            if not ok:
                self.acks_refused += 1
                self.logs.warning("ack_forbidden", "pubsub: ack of %r from %s refused (not "
                                  "allowed to subscribe it)", ack.stream[:64], peer_id)
                continue
            acks.append((peer_id, ack))
        floors: dict[tuple[Any, str], int] = {}
        logs: dict[str, Any] = {}
        with self.lock:
            for peer_id, ack in acks:
                st = self.streams.get(ack.stream)
                if st is None:
                    continue
                key = (peer_id, ack.name)
                if key not in st.positions:
                    if not self.ack_peer_budget.take(peer_id):
                        self._refuse_ack(peer_id, ack)
                        continue
                    if not self.ack_stream_budget.take(st.name):
                        self.ack_peer_budget.give(peer_id)
                        self._refuse_ack(peer_id, ack)
                        continue
                st.positions[key] = ack.position
                if st.log is not None:
                    logs[st.name] = st.log
                    floors[(st.name, f"{peer_id}/{ack.name}")] = ack.position
        for (stream, name), position in floors.items():
            # The committed position is a retention floor: the log keeps (persisted, within
            # its floor TTL and byte cap) what this subscriber has not handled.
            logs[stream].set_retention_floor(name, position)

    def _on_replicated(self, peer_id: str, body: object) -> None:
        # Reactor thread: a store holds the stream durably up to seq (under our epoch).
        try:
            rp = frames.decode_replicated(body)
        except (ProtocolError, CodecError) as exc:
            self.bad_requests += 1
            self.logs.warning("bad_replicated", "pubsub: bad replication ack from %s: %s",
                              peer_id, exc)
            return
        if self.secure and not self.node.permits(peer_id, "replicate", rp.stream):
            self.replicated_refused += 1
            return
        with self.lock:
            st = self.streams.get(rp.stream)
            if st is None or rp.epoch != st.epoch:
                return  # what it holds ends in another epoch: nothing of this one
            if peer_id not in st.replicas and len(st.replicas) >= MAX_REPLICAS_PER_STREAM:
                self.replicated_refused += 1
                return
            seq = min(rp.seq, st.next_seq)
            if seq <= st.replicas.get(peer_id, -1):
                return
            st.replicas[peer_id] = seq
        self.wake_replica_waiters()

    def wake_replica_waiters(self) -> None:
        with self.repl_cond:
            self.repl_cond.notify_all()
        for wake in list(self.repl_watchers):
            wake()

    def _refuse_ack(self, peer_id: str, ack: frames.Ack) -> None:
        self.acks_refused += 1
        self.logs.warning("ack_budget", "pubsub: ack %r/%r from %s refused: positions budget "
                          "full", ack.stream[:64], ack.name[:64], peer_id)


def _hub_for(node: Any, heartbeat_s: float, sndhwm: int, forget_after_s: float) -> _PubHub:
    return _registry.get_or_create(
        node, "pubsub.pub", lambda: _PubHub(node, heartbeat_s=heartbeat_s, sndhwm=sndhwm,
                                            forget_after_s=forget_after_s))


class Publisher:
    """Publishes events to one stream of this node.

    Durable (the default): each event is appended to the node's log for the stream
    (``<data_dir>/streams/<stream>``) before ``publish()`` returns, under the log's fsync
    policy, and its seq is its log offset, so a restarted publisher continues without reusing
    a seq and any subscriber can replay it. Best-effort (``durable=False``): no log; seqs
    restart at 0 under a new random epoch, and a subscriber skips (and counts) what it missed.

    Example::

        with Publisher(node, "sensors.temp") as pub:
            pub.publish({"c": 21.5}, type="reading")

    Args:
        node: the started :class:`mesh.node.Node`.
        stream: the stream name (also the topic: the first frame of every message).
        durable: log events (replayable) or not.
        log_config: the log's settings (fsync policy, retention); default fsync every 10 ms.
        source: the events' ``source``; default the node's name.
        heartbeat_s: interval of the head-seq heartbeat (node-wide, set by the first publisher).
            A stream whose head does not move beats at doubling intervals, up to
            ``min(10 s, 20 * heartbeat_s)``; the first beat after new events, and the next
            beat after a new subscription, go out at ``heartbeat_s``.
        forget_after_s: the durable-subscriber positions (``stats().positions``/``lag``) of
            a node that left the mesh and stayed away this long are dropped (node-wide, first
            publisher). Its retention floors have their own TTL (``LogConfig.floor_ttl_s``).
        sndhwm: the data socket's send high-water mark in messages per subscriber
            connection (node-wide, first publisher), at most :data:`DATA_HWM` (1024: 32 MiB
            of 32 KiB messages per subscriber).
        max_event_size: refuse events that encode larger than this.
        linger_s: when ``publish()`` is called again within 100 µs of this stream's last send,
            hold the event (at most this long, at most one DATA message's worth: about 105
            events of 100 B; sent as soon as the next event would not fit) and send it with
            the next ones as one DATA message: far less per-event work on both sides at high
            rates, at most ``linger_s`` more latency then, none at moderate rates. 0 disables it.
            Durable events are logged before ``publish()`` returns either way.
        sign: end-to-end Ed25519 signing of every event (mesh.security.signing): ``True``
            signs with the node's signer (``SecurityConfig(sign_events=True)``), an
            :class:`~mesh.security.signing.EventSigner` signs with that key, ``False`` never
            signs, ``None`` (default) signs exactly when the node has a signer. Signing
            happens before the hub lock is taken (the signature does not cover ``seq``). An
            event given to ``publish_event(s)`` that already carries a signature is sent as
            it is (a relay keeps the original publisher's signature). Off: the unsigned fast
            paths are unchanged.
        replicas: wait for replication (patterns/pubsub/store.py): ``publish()``,
            ``publish_many()`` and ``publish_events()`` return once this many stores hold
            the event(s) durably, else raise :class:`~mesh.errors.ReplicationTimeout` after
            ``replica_timeout_s`` (the events stay in the local log, published). 0: never
            wait (see :meth:`wait_replicated`).
        replica_timeout_s: how long a publish waits for ``replicas`` stores.
        resume_from_stores: when the stream's log holds no record (first start, a lost
            disk, a wiped stream directory), cannot be opened, or ends below what the
            stores hold of it (a tail cut by a power cut; the last two are moved to
            ``<data_dir>/aside/``), start a new log where the stores hold this node's
            stream up to (every start asks them, waiting up to this many seconds when
            none answers), under a new writer epoch, so no seq a store holds is used again
            (:func:`~patterns.pubsub.holdings.open_own_log`). Default: 2 s with
            ``replicas``, else 0 (off: the log starts at seq 0, and a store that held more
            keeps what the new epoch takes back in an archive, see
            :meth:`~patterns.pubsub.store.Store.archives`).

    Raises:
        ConfigError: bad stream name or settings, ``sign=True`` on a node without a signer,
            or this stream already has a publisher on this node.
        LogError: the stream's log cannot be opened (e.g. :class:`~mesh.errors.LogLocked`).
        ReplicationTimeout: (from the publish calls) with ``replicas``, fewer stores held
            the event in time.
    """

    def __init__(self, node: Any, stream: str, *, durable: bool = True,
                 log_config: LogConfig | None = None, source: str | None = None,
                 heartbeat_s: float = 0.5, sndhwm: int = 10_000,
                 forget_after_s: float = 24 * 3600.0,
                 max_event_size: int = DEFAULT_MAX_EVENT_BYTES, linger_s: float = 0.0005,
                 sign: bool | EventSigner | None = None, replicas: int = 0,
                 replica_timeout_s: float = 5.0,
                 resume_from_stores: float | None = None) -> None:
        if not stream or len(stream.encode()) > frames.MAX_TOPIC:
            raise ConfigError(f"bad stream name {stream!r}")
        if replicas < 0 or (replicas and not durable):
            raise ConfigError("replicas must be >= 0, and needs a durable stream")
        if replica_timeout_s < 0:
            raise ConfigError("replica_timeout_s must be >= 0")
        self.replicas = replicas
        self.replica_timeout_s = replica_timeout_s
        if heartbeat_s <= 0:
            raise ConfigError("heartbeat_s must be positive")
        if not 0 <= linger_s <= 1:
            raise ConfigError(f"linger_s must be within 0..1 s, got {linger_s}")
        self.node = node
        self.stream = stream
        self.durable = durable
        self.source = source or getattr(node, "name", None) or node.id
        self.max_event_size = max_event_size
        self._signer = _resolve_signer(node, sign)
        #: The encoder of plain events (see publish()); None when signing (every event goes
        #: through an Event) or when the source is invalid (each publish then says so).
        self._enc: NewEventEncoder | None = None
        if self._signer is None:
            try:
                self._enc = NewEventEncoder(self.source, stream, max_event_size)
            except CodecError:
                pass
        self._closed = False
        log = None
        if durable:
            wait_s = resume_from_stores if resume_from_stores is not None else \
                (2.0 if replicas else 0.0)
            # A lost log (missing, empty, unreadable) continues after the seqs the stores
            # still hold of this node's stream, under a new epoch (holdings.open_own_log).
            log = open_own_log(node, stream, log_config or LogConfig(), wait_s)
        if forget_after_s < 0:
            raise ConfigError("forget_after_s must be >= 0")
        hub = _hub_for(node, heartbeat_s, sndhwm, forget_after_s)
        with hub.lock:
            if stream in hub.streams:
                if log is not None:
                    log.close()
                raise ConfigError(f"stream {stream!r} already has a publisher on this node")
            # Durable: the log's writer epoch (new at every open, mesh/log/epochs.py), so a
            # subscriber tells this incarnation's seqs from ones an earlier one lost.
            epoch = log.epoch if log is not None else secrets.randbits(32) or 1
            self._st = st = _Stream(stream, durable, log, epoch)
            st.linger_s = linger_s
            hub.add_stream(st)
            hub.users += 1
        self._hub = hub
        self._log = log
        node.offer("stream", stream)
        self._unmetrics = attach(node, publisher_collector(self))
        self._unclose = close_with(node, self.close)  # node.close() closes it first

    # -- publishing -------------------------------------------------------------------------

    def publish(self, data: Any = None, *, type: str = "event", subject: str | None = None,
                headers: Mapping[str, str] | None = None, datacontenttype: str | None = None,
                correlationid: str | None = None, causationid: str | None = None,
                traceparent: str | None = None) -> int:
        """Publish one event; returns its seq.

        In durable mode the event is in the log (per the fsync policy) when this returns.

        Raises:
            ClosedError: the publisher is closed.
            CodecError: the event is malformed or too large (nothing was logged or sent).
            LogError: the append failed (e.g. :class:`~mesh.errors.LogFull`); nothing was sent.
        """
        # The common call (payload and type only, no signing, no trace context, no spans)
        # encodes with the publisher's own NewEventEncoder: the same bytes as encode_new.
        enc = self._enc
        plain = (enc is not None and subject is None and headers is None
                 and datacontenttype is None and correlationid is None and causationid is None
                 and traceparent is None and not in_context()
                 and ((_OTEL_SLOT and _otel_trace._TRACER_PROVIDER is None) or not otel_active()))
        if not plain and _otel_publish_span():
            # The event carries the publish span as its parent (explicit traceparent wins).
            token = _in_publish_span.set(True)
            try:
                with span("publish", self.stream):
                    return self.publish(
                        data, type=type, subject=subject, headers=headers,
                        datacontenttype=datacontenttype, correlationid=correlationid,
                        causationid=causationid, traceparent=traceparent or _span_traceparent())
            finally:
                _in_publish_span.reset(token)
        hub = self._hub
        st = self._st
        if not plain:
            # Inside a handler, the consumed event's trace context fills the unset fields.
            correlationid, causationid, traceparent = child_fields(correlationid, causationid,
                                                                   traceparent)
        signed = None
        if self._signer is not None:
            # Signed outside the lock: the signature does not cover seq.
            signed = self._signer.sign(Event(
                type=type, source=self.source, stream=self.stream, data=data, subject=subject,
                headers=headers, datacontenttype=datacontenttype, correlationid=correlationid,
                causationid=causationid, traceparent=traceparent))
        with hub.lock:
            if self._closed:
                raise ClosedError(f"publisher of {self.stream!r} is closed")
            seq = st.next_seq
            if plain:
                env = enc.encode(seq, type, data)  # type: ignore[union-attr]
            elif signed is None:
                # Straight to the envelope: the publisher never needs the Event object.
                # The encoder's id source (when there is one): ids follow seqs on both paths.
                env = encode_new(type=type, source=self.source, stream=self.stream, seq=seq,
                                 data=data, subject=subject, headers=headers,
                                 datacontenttype=datacontenttype, correlationid=correlationid,
                                 causationid=causationid, traceparent=traceparent,
                                 max_size=self.max_event_size,
                                 ids=enc.ids if enc is not None else None)
            else:
                env = encode(signed.replace(seq=seq), self.max_event_size)
            if self._log is not None:
                self._log.append(env)
            st.next_seq = seq + 1
            pend = st.pending
            if pend:
                nb = st.pending_bytes + len(env) + FRAME_COST
                if nb > DATA_MESSAGE_BYTES:
                    # It would not fit in the held message: that goes out full, this event
                    # starts the next batch (held from now).
                    try:
                        hub.flush(st)
                    except ClosedError as exc:
                        raise SendFailed(range(st.pending_first, seq + 1), st.durable,
                                         str(exc)) from exc
                    st.pending = [env]
                    st.pending_bytes = len(env) + FRAME_COST
                    st.pending_first = seq
                    st.pending_since = time.monotonic()
                else:
                    pend.append(env)
                    st.pending_bytes = nb
                    # Held long enough (do not rely on the reactor's timer alone: on a busy
                    # machine it may run late).
                    if time.monotonic() - st.pending_since >= st.linger_s:
                        hub.flush(st)
            elif st.linger_s and (now := time.monotonic()) - st.last_send < COALESCE_GAP_S:
                # Busy: hold it; the next calls join it, or the reactor sends it after linger_s.
                st.pending_first = seq
                st.pending_since = now
                st.pending_bytes = len(env) + FRAME_COST
                pend.append(env)
                if not st.timer_armed:
                    try:
                        self.node.reactor.call_later(st.linger_s, hub._flush_later, st)
                        st.timer_armed = True
                    except ClosedError:
                        hub.flush(st)
            else:
                try:
                    hub.send_data(st, seq, [env])
                except ClosedError as exc:
                    raise SendFailed(range(seq, seq + 1), st.durable, str(exc)) from exc
            st.stats.published += 1
        if self.replicas and not _no_replica_wait.get():
            self.wait_replicated(seq, self.replica_timeout_s)
        return seq

    def wait_replicated(self, seq: int, timeout: float | None = None, *,
                        replicas: int | None = None) -> None:
        """Return once ``replicas`` stores (default: the publisher's ``replicas``, at least
        1) hold seq ``seq`` durably (they acked ``pubsub.replicated`` past it, under this
        publisher's epoch): fsynced, or only written for a store run with the opt-in
        ``Store(sync="write")``.

        Raises:
            ReplicationTimeout: fewer stores held it when ``timeout`` passed (the event stays
                in the local log and published).
        """
        want = self._replicas_wanted(replicas)
        cond = self._hub.repl_cond
        with cond:
            if cond.wait_for(lambda: self._held(seq) >= want or self._closed, timeout) and \
                    self._held(seq) >= want:
                return
        raise ReplicationTimeout(self.stream, seq, want, self._held(seq))

    def _replicas_wanted(self, replicas: int | None) -> int:
        return replicas if replicas is not None else max(1, self.replicas)

    def _held(self, seq: int) -> int:
        """How many stores acked ``seq`` (any thread)."""
        return sum(1 for v in list(self._st.replicas.values()) if v > seq)

    def publish_event(self, event: Event) -> int:
        """Publish a prepared event (its ``stream`` and ``seq`` are set here); returns the seq.

        Raises:
            ClosedError: the publisher is closed.
            CodecError: the event is too large.
            LogError: the append failed; nothing was sent.
        """
        return self.publish_events([event])[0]

    def publish_many(self, items: Iterable[Any], *, type: str = "event",
                     subject: str | None = None) -> range:
        """Publish many payloads as events of one ``type``; returns their seqs.

        One log batch per :data:`BATCH_EVENTS` events, sent as DATA messages of up to
        :data:`DATA_MESSAGE_BYTES`: the way to throughput (per-batch costs, not per-event).

        Raises:
            ClosedError: the publisher is closed.
            CodecError: an event is malformed or too large (nothing of the call is logged).
            LogError: the append failed; nothing of the failed batch was sent.
        """
        if _otel_publish_span():
            token = _in_publish_span.set(True)
            try:
                with span("publish", self.stream):
                    return self.publish_many(items, type=type, subject=subject)
            finally:
                _in_publish_span.reset(token)
        datas = items if isinstance(items, list) else list(items)
        if self._signer is not None:
            src, stream = self.source, self.stream
            return self.publish_events([Event(type=type, source=src, stream=stream, data=d,
                                              subject=subject) for d in datas])
        hub = self._hub
        st = self._st
        with hub.lock:
            if self._closed:
                raise ClosedError(f"publisher of {self.stream!r} is closed")
            start = st.next_seq
            # One clock read and one id reservation for the batch; no Event objects.
            enc = self._enc
            envs = encode_new_many(datas, type=type, source=self.source, stream=self.stream,
                                   first_seq=start, subject=subject,
                                   max_size=self.max_event_size,
                                   ids=enc.ids if enc is not None else None)
            self._log_and_send(st, start, envs)
        if self.replicas and envs and not _no_replica_wait.get():
            self.wait_replicated(start + len(envs) - 1, self.replica_timeout_s)
        return range(start, start + len(envs))

    def publish_events(self, events: list[Event]) -> range:
        """Publish prepared events in order (``stream``/``seq`` set here); returns their seqs.

        With signing on, each event without a ``sig`` is signed (after its ``stream`` is set);
        an event that already carries one is sent unchanged (relayed with the original
        publisher's signature, which stays valid when the stream name is the same).

        Raises:
            ClosedError: the publisher is closed.
            CodecError: an event is too large (nothing of the call is logged).
            LogError: the append failed; nothing of the failed batch was sent.
        """
        hub = self._hub
        st = self._st
        maxsz = self.max_event_size
        stream = self.stream
        signer = self._signer
        if signer is not None:
            # Outside the lock; events already signed (relayed) keep their signature.
            events = [e if isinstance(e.extras.get("sig"), bytes)
                      else signer.sign(e.replace(stream=stream)) for e in events]
        with hub.lock:
            if self._closed:
                raise ClosedError(f"publisher of {self.stream!r} is closed")
            start = st.next_seq
            envs = [encode(ev.replace(stream=stream, seq=start + i), maxsz)
                    for i, ev in enumerate(events)]
            self._log_and_send(st, start, envs)
        if self.replicas and envs and not _no_replica_wait.get():
            self.wait_replicated(start + len(envs) - 1, self.replica_timeout_s)
        return range(start, start + len(envs))

    def _log_and_send(self, st: _Stream, start: int, envs: list[bytes]) -> None:
        # Under hub.lock: log and send in chunks of BATCH_EVENTS (one log batch; send_data
        # cuts it into messages of at most DATA_MESSAGE_BYTES). The seq moves with the log,
        # before the send: a failed send must never leave seqs behind the log's offsets.
        hub = self._hub
        for i in range(0, len(envs), BATCH_EVENTS):
            chunk = envs[i:i + BATCH_EVENTS]
            if self._log is not None:
                self._log.append_many(chunk)
            first = start + i
            st.next_seq = first + len(chunk)
            try:
                hub.flush(st)  # held single events go out before these
                hub.send_data(st, first, chunk)
            except ClosedError as exc:
                st.stats.published += first + len(chunk) - start
                raise SendFailed(range(start, first + len(chunk)), st.durable,
                                 str(exc)) from exc
        st.stats.published += len(envs)

    # -- introspection ----------------------------------------------------------------------

    @property
    def head(self) -> int:
        """The next seq to be assigned."""
        return self._st.next_seq

    @property
    def endpoints(self) -> list[str]:
        """The data socket's endpoints (for static wiring)."""
        return list(self._hub.endpoints)

    def stats(self) -> PublisherStats:
        """A snapshot of this publisher's counters and its durable subscribers' lag."""
        st = self._st
        with self._hub.lock:
            s = PublisherStats(**{**st.stats.__dict__})
            s.head = st.next_seq
            first = self._log.first_offset if self._log is not None else None
            s.oldest = st.next_seq if first is None else first
            hub = self._hub
            s.bad_requests = hub.bad_requests
            s.replay_busy = hub.replay_busy
            s.replay_dropped = hub.replay_dropped
            s.replay_bytes_held = hub.replay_budget.held()
            s.acks_refused = hub.acks_refused
            s.subscribers = len(st.rids)
            s.subscriptions_refused = hub.refused_subscriptions
            s.subscriptions_malformed = hub.bad_subscriptions
            s.subscriptions_held = hub.sub_conn.held()
            s.positions = {}
            for (_peer, name), pos in st.positions.items():
                s.positions[name] = max(pos, s.positions.get(name, 0))
            s.lag = {n: max(0, s.head - p) for n, p in s.positions.items()}
            s.replicated = dict(st.replicas)
        return s

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop publishing; close the stream's log (flushing it). Idempotent."""
        hub = self._hub
        with hub.lock:
            if self._closed:
                return
            self._closed = True
        hub.wake_replica_waiters()  # a wait_replicated() in progress ends now
        with hub.lock:
            try:
                hub.flush(self._st)
            except ClosedError:
                pass  # durable events are in the log; best-effort ones are lost as on any drop
            if hub.streams.pop(self.stream, None) is not None:
                for peer, _name in self._st.positions:
                    hub.ack_peer_budget.give(peer)
                hub.ack_stream_budget.drop(self.stream)
            hub.users -= 1
            last = hub.users == 0
        self._unmetrics()  # before the log closes: a scrape must not read a closed log
        self._unclose()
        try:
            self.node.withdraw("stream", self.stream)
        except MeshError:
            pass
        if self._log is not None:
            self._log.close()
        if last:
            _registry.drop(self.node, "pubsub.pub", hub)
            hub.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resolve_signer(node: Any, sign: bool | EventSigner | None) -> EventSigner | None:
    if sign is not None and not isinstance(sign, bool):
        from mesh.security.signing import EventSigner

        if isinstance(sign, EventSigner):
            return sign
    if sign is False:
        return None
    sec = getattr(node, "security", None)
    signer = sec.signer if sec is not None else None
    if sign and signer is None:
        raise ConfigError("sign=True needs a node with SecurityConfig(sign_events=True) "
                          "or an EventSigner")
    return signer


def _now() -> float:
    return time.monotonic()
