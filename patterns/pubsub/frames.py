"""Pub/sub wire frames: pure encoders and validating decoders, no I/O.

Data connection (pub/sub protocol 2: the publisher's ROUTER, role :data:`DATA_ROLE`, and one
connection per publisher from the subscriber's ROUTER), one ZeroMQ multipart message per
batch, publisher -> subscriber::

    frame 0   topic      the stream name, UTF-8 (empty only in a PING)
    frame 1   header     36 bytes, network byte order (see :data:`HEADER`)
    frame 2.. envelopes  one encoded :class:`mesh.envelope.Event` per frame (DATA only), or,
                         with the header's ``PACKED`` flag (since 2.4, sent only to a
                         connection that asked for it), one frame 2 holding all ``count``
                         envelopes back to back (each is a msgpack array: self-delimiting)

and subscriber -> publisher, a subscription request (:func:`encode_subscribe`)::

    frame 0   request    4 bytes: version u8, op u8 (SUBSCRIBE / UNSUBSCRIBE), flags u8
                         (bit 0: prefix; bit 1: packed DATA wanted, since 2.4), reserved u8
    frame 1   topic      the stream name or prefix, UTF-8, 0..255 bytes

Control channel bodies (msgpack maps carried by ``node.send``): ``pubsub.replay``,
``pubsub.replay_data`` and ``pubsub.ack``. Every decoder here raises a typed error
(:class:`~mesh.errors.ProtocolError`, :class:`~mesh.errors.UnsupportedVersion` or
:class:`~mesh.errors.EventTooLarge`) on anything malformed; callers count and drop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple

import msgpack

from mesh.errors import EventTooLarge, ProtocolError, UnsupportedVersion

#: Version byte of the pub/sub frames (data header, subscription request, control bodies).
#: The frame layouts are those of protocol 1; protocol 2 changed the data *socket* (a ROUTER
#: under :data:`DATA_ROLE` instead of an XPUB under ``"pub"``), which old peers simply do not
#: find (see docs/protocol.md, "Pub/sub protocol").
VERSION = 1
SUPPORTED = (VERSION,)
#: The pub/sub protocol version (major, minor) this build speaks.
PROTOCOL = (2, 4)
#: The role the publisher's data ROUTER is announced under (``PeerInfo.endpoints``).
DATA_ROLE = "pubsub"
#: The role protocol-1 publishers announced their XPUB under (recognised, never connected).
OLD_DATA_ROLE = "pub"

KIND_DATA = 1
KIND_HEARTBEAT = 2
#: A subscription request was refused: ``count`` is the reason (``REFUSED_*``), the topic
#: frame the refused topic or prefix (publisher -> subscriber, since 2.0).
KIND_REFUSED = 3
#: A liveness probe of the connection (empty topic, ignored by the subscriber; since 2.0).
KIND_PING = 4
FLAG_DURABLE = 0x01
#: DATA header flag (since 2.4): frame 2 is the only envelope frame and holds all ``count``
#: envelopes concatenated (a packed DATA message). Sent only on a connection whose
#: subscription request carried :data:`SUB_PACKED`.
FLAG_PACKED = 0x02
_FLAGS = FLAG_DURABLE | FLAG_PACKED

#: Subscription request ops and flags.
OP_SUBSCRIBE = 1
OP_UNSUBSCRIBE = 2
SUB_PREFIX = 0x01
#: Subscription request flag (since 2.4): send this connection packed DATA messages. A 2.3
#: publisher refuses a request with it (REFUSED ``malformed``: unknown flag), and the
#: subscriber then asks again without it, getting one frame per envelope.
SUB_PACKED = 0x02
SUBREQ = struct.Struct("!BBBx")
#: Refusal reasons (the ``count`` of a REFUSED header).
REFUSED_FORBIDDEN = 1  # the connection's key may not subscribe to it
REFUSED_BUDGET = 2  # over the per-connection, per-peer or node subscription budget
REFUSED_MALFORMED = 3  # the request did not decode
REFUSED_REASONS = {REFUSED_FORBIDDEN: "forbidden", REFUSED_BUDGET: "budget",
                   REFUSED_MALFORMED: "malformed"}

#: version u8, kind u8, flags u8, reserved u8, publisher node id (16 raw bytes), epoch u32,
#: seq u64 (first seq of the batch; for a heartbeat the head = next seq to be assigned),
#: count u32 (events in the batch; 0 for a heartbeat).
HEADER = struct.Struct("!BBBx16sIQI")

MAX_TOPIC = 255

#: Control message kinds on the node's control channel.
CTRL_REPLAY = "pubsub.replay"
CTRL_REPLAY_DATA = "pubsub.replay_data"
CTRL_ACK = "pubsub.ack"
#: Replicated streams (since 2.3; patterns/pubsub/store.py): a subscriber or store asks a
#: store for a range of an origin's stream (a ``pubsub.replay`` body plus ``origin``; the
#: answer is a ``pubsub.replay_data`` plus ``origin``), a store acks what it holds durably to
#: the origin, and anyone asks a store which origin streams it holds.
CTRL_FETCH = "pubsub.fetch"
CTRL_REPLICATED = "pubsub.replicated"
CTRL_HOLDINGS_REQ = "pubsub.holdings_req"
CTRL_HOLDINGS = "pubsub.holdings"
#: The service name a store offers (``node.offer("service", STORE_SERVICE)``).
STORE_SERVICE = "pubsub.store"
#: The most items one ``pubsub.holdings`` answer carries (the rest: ``more`` is true).
MAX_HOLDINGS = 1000
#: What a ``pubsub.replay`` without ``max`` / ``max_bytes`` asks for (and the most a
#: publisher ever sends in one reply): 5000 records, 4 MiB of envelopes.
REPLAY_MAX_RECORDS = 5000
REPLAY_MAX_BYTES = 4 << 20
#: ``pubsub.replay_data.error`` for a request that did not decode (since 1.3).
REPLAY_ERROR_MALFORMED = "malformed"


class Header(NamedTuple):
    """A decoded data/heartbeat header.

    A NamedTuple rather than a frozen dataclass: one is built per received message, and a
    tuple is built in one step where a frozen dataclass pays an ``object.__setattr__`` per field.

    Attributes:
        kind: :data:`KIND_DATA`, :data:`KIND_HEARTBEAT`, :data:`KIND_REFUSED` or
            :data:`KIND_PING`.
        durable: the stream is logged, so gaps can be replayed.
        publisher: the publisher's node id, 32 lowercase hex chars.
        epoch: 0 for durable streams; a random non-zero id per best-effort publisher instance
            (a restarted best-effort publisher starts again at seq 0 under a new epoch).
        seq: first seq of the batch (DATA) or head seq (HEARTBEAT).
        count: number of envelopes (DATA), the reason (REFUSED) or 0.
    """

    kind: int
    durable: bool
    publisher: str
    epoch: int
    seq: int
    count: int  # type: ignore[assignment]  # shadows tuple.count(), never called on a header


# Decoded topic and publisher-id strings by their raw bytes: a subscriber hears few distinct
# publishers and streams, and decoding them per message is measurable. Bounded: cleared when
# it grows past _CACHE_MAX (garbage topics cannot grow it without limit).
_CACHE_MAX = 4096
_topics: dict[bytes, str] = {}
_pubs: dict[bytes, str] = {}


def node_id_bytes(node_id: str) -> bytes:
    """The 16 raw bytes of a 32-hex-char node id.

    Raises:
        ProtocolError: the id is not 32 hex chars.
    """
    try:
        raw = bytes.fromhex(node_id)
    except ValueError as exc:
        raise ProtocolError(f"node id {node_id!r} is not hex") from exc
    if len(raw) != 16:
        raise ProtocolError(f"node id {node_id!r} is not 16 bytes")
    return raw


def encode_data(topic: bytes, publisher: bytes, epoch: int, first_seq: int,
                envelopes: list[bytes], durable: bool, *, packed: bool = False) -> list[bytes]:
    """The frames of one DATA message carrying ``envelopes`` from ``first_seq`` on: one frame
    per envelope, or with ``packed`` (since 2.4) one frame holding them all back to back."""
    head = data_header(publisher, epoch, first_seq, len(envelopes), durable, packed=packed)
    if packed:
        return [topic, head, b"".join(envelopes)]
    return [topic, head, *envelopes]


def data_header(publisher: bytes, epoch: int, first_seq: int, count: int,
                durable: bool, *, packed: bool = False) -> bytes:
    """Frame 1 of a DATA message (the publisher sends the frames itself, one call each)."""
    flags = (FLAG_DURABLE if durable else 0) | (FLAG_PACKED if packed else 0)
    return HEADER.pack(VERSION, KIND_DATA, flags, publisher, epoch, first_seq, count)


def encode_heartbeat(topic: bytes, publisher: bytes, epoch: int, head: int,
                     durable: bool) -> list[bytes]:
    """The frames of one HEARTBEAT message announcing ``head`` (the next seq to be assigned)."""
    return [topic, HEADER.pack(VERSION, KIND_HEARTBEAT, FLAG_DURABLE if durable else 0,
                               publisher, epoch, head, 0)]


def encode_refused(topic: bytes, publisher: bytes, reason: int) -> list[bytes]:
    """The frames of a REFUSED notice for the subscription request of ``topic``."""
    return [topic, HEADER.pack(VERSION, KIND_REFUSED, 0, publisher, 0, 0, reason)]


def encode_ping(publisher: bytes) -> list[bytes]:
    """The frames of a PING (a liveness probe the subscriber ignores)."""
    return [b"", HEADER.pack(VERSION, KIND_PING, 0, publisher, 0, 0, 0)]


def encode_subscribe(topic: bytes, *, prefix: bool, unsubscribe: bool = False,
                     packed: bool = False) -> list[bytes]:
    """The frames of a subscription request (subscriber -> publisher on the data connection).

    ``topic`` is a stream name (``prefix`` False: exactly that stream) or a prefix (every
    stream whose name starts with it; an empty prefix is every stream). ``packed`` (since
    2.4) asks for packed DATA messages on this connection (:data:`SUB_PACKED`).
    """
    op = OP_UNSUBSCRIBE if unsubscribe else OP_SUBSCRIBE
    flags = (SUB_PREFIX if prefix else 0) | (SUB_PACKED if packed else 0)
    return [SUBREQ.pack(VERSION, op, flags), topic]


def decode_subscribe(frames: list[bytes]) -> tuple[int, str, bool]:
    """Validate a subscription request: ``(op, topic, prefix)`` (see
    :func:`decode_subscription` for the packed flag too)."""
    op, name, prefix, _packed = decode_subscription(frames)
    return op, name, prefix


def decode_subscription(frames: list[bytes]) -> tuple[int, str, bool, bool]:
    """Validate a subscription request: ``(op, topic, prefix, packed)``.

    Raises:
        ProtocolError: wrong frame count or size, unknown op or flags, bad topic.
        UnsupportedVersion: the request's version is not one this build speaks.
    """
    if len(frames) != 2:
        raise ProtocolError(f"subscription request has {len(frames)} frame(s), expected 2")
    head, topic = frames
    if len(head) != SUBREQ.size:
        raise ProtocolError(f"subscription request header is {len(head)} bytes")
    version, op, flags = SUBREQ.unpack(head)
    if version != VERSION:
        raise UnsupportedVersion(version, SUPPORTED)
    if op not in (OP_SUBSCRIBE, OP_UNSUBSCRIBE) or flags & ~(SUB_PREFIX | SUB_PACKED):
        raise ProtocolError(f"unknown subscription op {op} / flags {flags:#x}")
    prefix = bool(flags & SUB_PREFIX)
    if len(topic) > MAX_TOPIC or (not topic and not prefix):
        raise ProtocolError(f"bad subscription topic length {len(topic)}")
    try:
        name = topic.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("subscription topic is not UTF-8") from exc
    return op, name, prefix, bool(flags & SUB_PACKED)


class Packed:
    """The envelopes of a packed DATA message (since 2.4), as :func:`decode_message` found
    them: ``blob`` is frame 2, ``arrays`` the ``count`` msgpack values it holds, in order
    (each an envelope, not yet checked as one: :func:`mesh.envelope.from_unpacked` does).

    ``len()`` is the event count; :meth:`envelopes` gives each envelope's exact bytes (the
    store keeps them, a signature is checked over them), cut out only when asked for.
    """

    __slots__ = ("_envs", "arrays", "blob")

    def __init__(self, blob: bytes, arrays: list[Any] | None,
                 envs: list[bytes] | None = None) -> None:
        self.blob = blob
        self.arrays = arrays
        self._envs = envs

    def __len__(self) -> int:
        return len(self._envs) if self._envs is not None else len(self.arrays or ())

    def envelopes(self) -> list[bytes]:
        """Each envelope's bytes, in order (cut from ``blob`` on the first call)."""
        envs = self._envs
        if envs is None:
            envs = self._envs = split_packed(self.blob, len(self), 1 << 62)
        return envs


#: What a run of envelopes is, as the data socket delivers it: one bytes per envelope, or a
#: packed message's :class:`Packed` (its :meth:`Packed.envelopes` are the same bytes).
Run = list[bytes] | Packed


def run_envelopes(run: Run) -> list[bytes]:
    """The envelope bytes of a run, whichever way it came."""
    return run.envelopes() if isinstance(run, Packed) else run


def _unpacker(blob: bytes) -> Any:
    # Bounded by the frame itself, as unpackb bounds a lone envelope by its buffer (a
    # max_buffer_size of 0 would mean msgpack's 100 MiB default).
    u = msgpack.Unpacker(max_buffer_size=max(1, len(blob)))
    u.feed(blob)
    return u


def split_packed(blob: bytes, count: int, max_event_size: int) -> list[bytes]:
    """Cut a packed frame into its ``count`` envelopes (msgpack values are self-delimiting).

    Raises:
        ProtocolError: the frame does not hold exactly ``count`` well-formed msgpack values
            (truncated, trailing bytes, fewer or more, nesting too deep).
        EventTooLarge: an envelope is larger than ``max_event_size``.
    """
    u = _unpacker(blob)
    out = []
    pos = 0
    skip, tell = u.skip, u.tell
    try:
        for _ in range(count):
            skip()
            end = tell()
            out.append(blob[pos:end])
            pos = end
    except msgpack.OutOfData:
        raise ProtocolError(f"packed DATA frame holds fewer than {count} envelopes "
                            f"({len(out)} whole, {len(blob) - pos} bytes left)") from None
    except (ValueError, msgpack.StackError, msgpack.FormatError) as exc:
        raise ProtocolError(f"packed DATA frame is not msgpack after envelope {len(out)}: "
                            f"{exc}") from None
    if pos != len(blob):
        raise ProtocolError(f"packed DATA frame has {len(blob) - pos} bytes after its "
                            f"{count} envelopes")
    if len(blob) > max_event_size:
        for env in out:
            if len(env) > max_event_size:
                raise EventTooLarge(len(env), max_event_size)
    return out


def _decode_packed(blob: bytes, count: int, max_event_size: int) -> Packed:
    """Validate frame 2 of a packed DATA message (see :func:`split_packed` for the errors)."""
    if len(blob) <= max_event_size:
        # Every envelope is smaller than the frame: no size to check one by one. One C pass
        # unpacks them all; anything it refuses (bad UTF-8 in one envelope, a map key it
        # will not take) is looked at envelope by envelope below, as the frames of an
        # unpacked message are: a bad envelope is one undecodable event, not a bad message.
        u = _unpacker(blob)
        try:
            arrays = list(islice(u, count + 1))  # one more: a frame holding more is refused
        except Exception:  # any unpack failure: the careful path decides
            arrays = None
        if arrays is not None and len(arrays) == count and u.tell() == len(blob):
            return Packed(blob, arrays)
    return Packed(blob, None, split_packed(blob, count, max_event_size))


def decode_message(frames: list[bytes], *, max_event_size: int,
                   max_batch: int = 100_000) -> tuple[str, Header, Run]:
    """Validate one message from the data socket.

    Returns:
        (stream, header, envelopes): envelopes is empty for a heartbeat, a REFUSED notice
        (``stream`` is the refused topic, ``count`` the reason) or a PING (``stream`` "");
        a :class:`Packed` for a packed DATA message (``len()`` = ``count``), else one bytes
        per envelope.

    Raises:
        ProtocolError: wrong frame count, bad topic, bad header, count mismatch; a packed
            frame that does not hold exactly ``count`` msgpack values.
        UnsupportedVersion: the header's version is not one this build speaks.
        EventTooLarge: an envelope frame is larger than ``max_event_size``.
    """
    if len(frames) < 2:
        raise ProtocolError(f"pub/sub message has {len(frames)} frame(s), expected >= 2")
    topic, head = frames[0], frames[1]
    if (not topic or len(topic) > MAX_TOPIC) and (
            len(topic) > MAX_TOPIC or head[1:2] not in (b"\x03", b"\x04")):
        raise ProtocolError(f"bad topic length {len(topic)}")
    if len(head) != HEADER.size:
        if head[:1] and head[0] != VERSION:
            raise UnsupportedVersion(head[0], SUPPORTED)
        raise ProtocolError(f"header is {len(head)} bytes, expected {HEADER.size}")
    version, kind, flags, pub, epoch, seq, count = HEADER.unpack(head)
    if version != VERSION:
        raise UnsupportedVersion(version, SUPPORTED)
    stream = _topics.get(topic)
    if stream is None:
        try:
            stream = topic.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("topic is not UTF-8") from exc
        if len(_topics) >= _CACHE_MAX:
            _topics.clear()
        _topics[topic] = stream
    body = frames[2:]
    if kind == KIND_DATA and flags & FLAG_PACKED and not flags & ~_FLAGS:
        if len(body) != 1 or count == 0:
            raise ProtocolError(f"packed DATA has {len(body)} envelope frames (count {count}), "
                                "expected 1")
        if count > max_batch:
            raise ProtocolError(f"batch of {count} events exceeds {max_batch}")
        if count > len(body[0]):  # every envelope is at least one byte
            raise ProtocolError(f"packed DATA says {count} events in {len(body[0])} bytes")
        packed = _decode_packed(body[0], count, max_event_size)
        return (stream, Header(kind, bool(flags & FLAG_DURABLE), _pub_id(pub), epoch, seq,
                               count), packed)
    if kind == KIND_DATA:
        if count != len(body) or count == 0:
            raise ProtocolError(f"DATA header says {count} events, message has {len(body)}")
        if count > max_batch:
            raise ProtocolError(f"batch of {count} events exceeds {max_batch}")
        for env in body:
            if len(env) > max_event_size:
                raise EventTooLarge(len(env), max_event_size)
    elif kind == KIND_HEARTBEAT:
        if count != 0 or body:
            raise ProtocolError("HEARTBEAT carries no events")
    elif kind in (KIND_REFUSED, KIND_PING):
        if body:
            raise ProtocolError("REFUSED/PING carry no events")
    else:
        raise ProtocolError(f"unknown pub/sub frame kind {kind}")
    if flags & ~FLAG_DURABLE:
        raise ProtocolError(f"unknown flags {flags:#x}")
    return stream, Header(kind, flags == FLAG_DURABLE, _pub_id(pub), epoch, seq, count), body


def _pub_id(pub: bytes) -> str:
    pub_id = _pubs.get(pub)
    if pub_id is None:
        if len(_pubs) >= _CACHE_MAX:
            _pubs.clear()
        pub_id = _pubs[pub] = pub.hex()
    return pub_id


# --- control bodies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """``pubsub.replay``: the subscriber asks a publisher's node for a range of its log.

    Attributes:
        sid: opaque id of the asking subscriber (echoed in the reply for routing).
        req: request number (echoed; the subscriber ignores stale replies).
        stream: the stream name.
        start: first seq wanted, or None when ``from_time`` is given.
        from_time: a UTC timestamp in ns: start at the first record at or after it.
        end: one past the last seq wanted, or None for "up to the head".
        max_records: the most records to put in one reply.
        max_bytes: the most envelope bytes to put in one reply.
        epoch: the writer epoch under which the subscriber saw everything below ``start``
            (None: unknown, e.g. a position from an older version; the publisher trusts it).
            The publisher answers from the divergence point when its log no longer agrees
            (see :attr:`ReplayData.truncate`).
        max_event: the largest envelope the subscriber accepts (None: no limit said); the
            publisher skips larger events instead of sending them.
        tok: the :attr:`ReplayData.tok` of the latest reply this node received from the
            publisher's node (None: none yet). It proves that reply, and everything the
            publisher sent this node before it, was read: the publisher returns those bytes
            to the asking peer's replay budget.
        origin: ``pubsub.fetch`` only: the node id of the stream's origin (the store holds
            copies of many origins' streams); None in a ``pubsub.replay``.
    """

    sid: str
    req: int
    stream: str
    start: int | None
    from_time: int | None
    end: int | None
    max_records: int
    max_bytes: int
    epoch: int | None = None
    max_event: int | None = None
    tok: int | None = None
    origin: str | None = None

    def to_body(self) -> dict[str, Any]:
        """The msgpack-able map for ``node.send``."""
        body = {"v": VERSION, "sid": self.sid, "req": self.req, "stream": self.stream,
                "from": self.start, "from_time": self.from_time, "to": self.end,
                "max": self.max_records, "max_bytes": self.max_bytes}
        if self.epoch is not None:
            body["epoch"] = self.epoch
        if self.max_event is not None:
            body["max_event"] = self.max_event
        if self.tok is not None:
            body["tok"] = self.tok
        if self.origin is not None:
            body["origin"] = self.origin
        return body


@dataclass(frozen=True, slots=True)
class ReplayData:
    """``pubsub.replay_data``: one chunk of a replay.

    Attributes:
        sid: the subscriber id from the request.
        req: the request number from the request.
        stream: the stream name.
        first: seq of ``events[0]`` (or, with no events, where the next read would start).
        events: encoded envelopes, contiguous from ``first``.
        head: the publisher's head seq (next seq it will assign) when the chunk was read.
        oldest: the first seq the publisher still holds (retention).
        gone: the requested start was below ``oldest`` (deleted by retention).
        error: a short reason when the publisher could not serve the request, else None.
        epoch: the publisher's current writer epoch: the events returned (and everything
            below them) belong to it (0: not said, an older publisher).
        truncate: set when the request's ``epoch`` and ``from`` disagree with the log: the
            divergence point (< ``from``); ``first`` starts there. Everything the subscriber
            saw at or after it is not in the log any more.
        skip: ``(start, end, reason)``: seqs ``start..end-1`` will never be served (reason
            ``"damaged"``: unreadable in the log; ``"oversize"``: larger than the request's
            ``max_event``); ``first`` is at or after ``end``.
        epoch_end: where the request's ``epoch`` ended in this log (the next epoch's start),
            when it is known and not the current one; None otherwise. A subscriber that knew
            of seqs of that epoch at or beyond it learns they are lost.
        oversize: envelopes the subscriber dropped from this chunk as larger than its limit
            (filled by the decoder, never sent).
        tok: an unguessable number naming this reply (None: an older publisher, or the
            node's own hub); the asking node echoes the latest one in its next request
            (:attr:`ReplayRequest.tok`).
        retry_ms: with ``error="busy"`` (the asking peer is over its replay budget, or its
            connection is backed up): ask again no sooner than this.
        origin: the answer to a ``pubsub.fetch``: the origin whose stream ``events`` are
            (the sender is a store); None: the sender is the origin itself.
    """

    sid: str
    req: int
    stream: str
    first: int
    events: list[bytes]
    head: int
    oldest: int
    gone: bool = False
    error: str | None = None
    epoch: int = 0
    truncate: int | None = None
    skip: tuple[int, int, str] | None = None
    epoch_end: int | None = None
    oversize: int = 0
    tok: int | None = None
    retry_ms: int | None = None
    origin: str | None = None

    def to_body(self) -> dict[str, Any]:
        """The msgpack-able map for ``node.send``."""
        body = {"v": VERSION, "sid": self.sid, "req": self.req, "stream": self.stream,
                "first": self.first, "events": self.events, "head": self.head,
                "oldest": self.oldest, "gone": self.gone, "error": self.error,
                "epoch": self.epoch}
        if self.truncate is not None:
            body["truncate"] = self.truncate
        if self.skip is not None:
            body["skip"] = list(self.skip)
        if self.epoch_end is not None:
            body["epoch_end"] = self.epoch_end
        if self.tok is not None:
            body["tok"] = self.tok
        if self.retry_ms is not None:
            body["retry_ms"] = self.retry_ms
        if self.origin is not None:
            body["origin"] = self.origin
        return body


@dataclass(frozen=True, slots=True)
class Ack:
    """``pubsub.ack``: a durable subscriber tells the publisher its committed position.

    Attributes:
        name: the durable subscription name.
        stream: the stream name.
        position: the next seq the subscriber will process (everything below is done).
    """

    name: str
    stream: str
    position: int

    def to_body(self) -> dict[str, Any]:
        """The msgpack-able map for ``node.send``."""
        return {"v": VERSION, "name": self.name, "stream": self.stream, "pos": self.position}


def _check_map(body: object, kind: str) -> dict[Any, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind} body is {type(body).__name__}, expected a map")
    v = body.get("v")
    if v != VERSION:
        raise UnsupportedVersion(v, SUPPORTED)
    return body


def _str(body: dict[Any, Any], key: str, kind: str, *, limit: int = 1024) -> str:
    val = body.get(key)
    if not isinstance(val, str) or len(val) > limit:
        raise ProtocolError(f"{kind}.{key} must be a string of at most {limit} chars")
    return val


def _int(body: dict[Any, Any], key: str, kind: str, *, optional: bool = False) -> int | None:
    val = body.get(key)
    if val is None and optional:
        return None
    if not isinstance(val, int) or isinstance(val, bool) or val < 0 or val >= 2**64:
        raise ProtocolError(f"{kind}.{key} must be an unsigned 64-bit integer")
    return val


def _req_int(body: dict[Any, Any], key: str, kind: str) -> int:
    val = _int(body, key, kind)
    assert val is not None  # not optional
    return val


def _origin(body: dict[Any, Any], kind: str) -> str | None:
    val = body.get("origin")
    if val is None:
        return None
    if not isinstance(val, str) or len(val) != 32 or val.strip("0123456789abcdef"):
        raise ProtocolError(f"{kind}.origin must be a node id (32 lowercase hex chars)")
    return val


def decode_replay_request(body: object) -> ReplayRequest:
    """Validate a ``pubsub.replay`` body.

    Raises:
        ProtocolError: a field is missing or mistyped.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_REPLAY
    m = _check_map(body, kind)
    start = _int(m, "from", kind, optional=True)
    from_time = _int(m, "from_time", kind, optional=True)
    if start is None and from_time is None:
        raise ProtocolError(f"{kind} needs 'from' or 'from_time'")
    # optional since 1.3 (a request without them was dropped unanswered before): absent or
    # nil means the publisher's own caps
    max_records = _int(m, "max", kind, optional=True)
    max_bytes = _int(m, "max_bytes", kind, optional=True)
    max_records = REPLAY_MAX_RECORDS if max_records is None else max_records
    max_bytes = REPLAY_MAX_BYTES if max_bytes is None else max_bytes
    if max_records == 0 or max_bytes == 0:
        raise ProtocolError(f"{kind}.max and max_bytes must be positive")
    epoch = _int(m, "epoch", kind, optional=True)
    if epoch is not None and epoch >= 1 << 32:
        raise ProtocolError(f"{kind}.epoch must be a 32-bit integer")
    max_event = _int(m, "max_event", kind, optional=True)
    return ReplayRequest(_str(m, "sid", kind), _req_int(m, "req", kind),
                         _str(m, "stream", kind, limit=MAX_TOPIC), start, from_time,
                         _int(m, "to", kind, optional=True), max_records, max_bytes, epoch,
                         max_event or None, _int(m, "tok", kind, optional=True),
                         _origin(m, kind))


def decode_replay_data(body: object, *, max_event_size: int) -> ReplayData:
    """Validate a ``pubsub.replay_data`` body.

    An envelope larger than ``max_event_size`` ends the chunk there (``events`` keeps the
    ones before it; ``oversize`` is 1): one oversize event never costs the whole chunk.

    Raises:
        ProtocolError: a field is missing or mistyped.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_REPLAY_DATA
    m = _check_map(body, kind)
    events = m.get("events")
    if not isinstance(events, list) or not all(isinstance(e, bytes) for e in events):
        raise ProtocolError(f"{kind}.events must be a list of bytes")
    oversize = 0
    for i, env in enumerate(events):
        if len(env) > max_event_size:
            events = events[:i]
            oversize = 1
            break
    epoch = _int(m, "epoch", kind, optional=True) or 0
    truncate = _int(m, "truncate", kind, optional=True)
    skip = m.get("skip")
    if skip is not None:
        if (not isinstance(skip, list) or len(skip) != 3 or not isinstance(skip[2], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64
                           for x in skip[:2]) or skip[0] >= skip[1] or len(skip[2]) > 64):
            raise ProtocolError(f"{kind}.skip must be [start, end, reason] with start < end")
        skip = (skip[0], skip[1], skip[2])
    error = m.get("error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError(f"{kind}.error must be a string or nil")
    gone = m.get("gone", False)
    if not isinstance(gone, bool):
        raise ProtocolError(f"{kind}.gone must be a bool")
    return ReplayData(_str(m, "sid", kind), _req_int(m, "req", kind),
                      _str(m, "stream", kind, limit=MAX_TOPIC), _req_int(m, "first", kind),
                      events, _req_int(m, "head", kind), _req_int(m, "oldest", kind), gone, error,
                      epoch, truncate, skip, _int(m, "epoch_end", kind, optional=True),
                      oversize, _int(m, "tok", kind, optional=True),
                      _int(m, "retry_ms", kind, optional=True), _origin(m, kind))


def replay_reply_target(body: object) -> tuple[str, int, str] | None:
    """``(sid, req, stream)`` of a ``pubsub.replay`` body that failed to decode, when those
    three are usable: the publisher then answers ``error="malformed"`` (since 1.3) so the
    subscriber sees why instead of retrying a request that is never answered. None: the
    body cannot be answered (no usable ``sid``/``req``/``stream``, or another ``v``)."""
    if not isinstance(body, dict) or body.get("v") != VERSION:
        return None
    sid, req, stream = body.get("sid"), body.get("req"), body.get("stream")
    if (not isinstance(sid, str) or len(sid) > 1024 or not isinstance(stream, str)
            or len(stream) > MAX_TOPIC or not isinstance(req, int) or isinstance(req, bool)
            or not 0 <= req < 2**64):
        return None
    return sid, req, stream


def decode_ack(body: object) -> Ack:
    """Validate a ``pubsub.ack`` body.

    Raises:
        ProtocolError: a field is missing or mistyped.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_ACK
    m = _check_map(body, kind)
    return Ack(_str(m, "name", kind), _str(m, "stream", kind, limit=MAX_TOPIC),
               _req_int(m, "pos", kind))



# --- replicated streams (since 2.3) ------------------------------------------------------------


def decode_fetch(body: object) -> ReplayRequest:
    """Validate a ``pubsub.fetch`` body (a ``pubsub.replay`` body with a required ``origin``).

    Raises:
        ProtocolError: a field is missing or mistyped, or ``origin`` is absent.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    rq = decode_replay_request(body)
    if rq.origin is None:
        raise ProtocolError(f"{CTRL_FETCH} needs 'origin'")
    return rq


@dataclass(frozen=True, slots=True)
class Replicated:
    """``pubsub.replicated``: a store tells the origin it holds a stream durably up to a seq.

    Attributes:
        stream: the stream name.
        epoch: the origin's writer epoch of the last event the store holds.
        seq: one past the last seq the store holds (everything below it that the origin
            still had when the store read it is on the store's disk, fsynced).
    """

    stream: str
    epoch: int
    seq: int

    def to_body(self) -> dict[str, Any]:
        """The msgpack-able map for ``node.send``."""
        return {"v": VERSION, "stream": self.stream, "epoch": self.epoch, "seq": self.seq}


def decode_replicated(body: object) -> Replicated:
    """Validate a ``pubsub.replicated`` body.

    Raises:
        ProtocolError: a field is missing or mistyped.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_REPLICATED
    m = _check_map(body, kind)
    epoch = _req_int(m, "epoch", kind)
    if epoch >= 1 << 32:
        raise ProtocolError(f"{kind}.epoch must be a 32-bit integer")
    return Replicated(_str(m, "stream", kind, limit=MAX_TOPIC), epoch, _req_int(m, "seq", kind))


@dataclass(frozen=True, slots=True)
class Holding:
    """One origin stream a store holds: seqs ``oldest..head-1`` of ``origin``'s ``stream``,
    the last of them under the origin's writer epoch ``epoch``."""

    origin: str
    stream: str
    oldest: int
    head: int
    epoch: int


def encode_holdings_req(prefix: str, req: int,
                        after: tuple[str, str] | None = None) -> dict[str, Any]:
    """A ``pubsub.holdings_req`` body: which streams whose name starts with ``prefix``
    (``""``: all) does the store hold? ``after`` (an answer's ``next`` cursor, ``(origin,
    stream)``) asks for the page that follows it (replicated streams 1.1)."""
    body: dict[str, Any] = {"v": VERSION, "prefix": prefix, "req": req}
    if after is not None:
        body["after"] = [after[0], after[1]]
    return body


def _cursor(m: dict[Any, Any], key: str, kind: str) -> tuple[str, str] | None:
    val = m.get(key)
    if val is None:
        return None
    if not isinstance(val, list) or len(val) != 2:
        raise ProtocolError(f"{kind}.{key} must be [origin, stream]")
    row = {"origin": val[0], "stream": val[1]}
    origin = _origin(row, kind)
    if origin is None:
        raise ProtocolError(f"{kind}.{key} needs an origin")
    return origin, _str(row, "stream", kind, limit=MAX_TOPIC)


def decode_holdings_req(body: object) -> tuple[str, int, tuple[str, str] | None]:
    """Validate a ``pubsub.holdings_req`` body: ``(prefix, req, after)`` (``after``: None,
    or the ``(origin, stream)`` cursor of the previous page).

    Raises:
        ProtocolError: a field is missing or mistyped.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_HOLDINGS_REQ
    m = _check_map(body, kind)
    return (_str(m, "prefix", kind, limit=MAX_TOPIC), _req_int(m, "req", kind),
            _cursor(m, "after", kind))


def holdings_order(origin: str, stream: str) -> tuple[str, str]:
    """The order a store pages its holdings in (stream, then origin): every stream of one
    prefix is a contiguous range of it."""
    return stream, origin


def encode_holdings(req: int, items: list[Holding], more: bool,
                    next_after: tuple[str, str] | None = None) -> dict[str, Any]:
    """A ``pubsub.holdings`` body (at most :data:`MAX_HOLDINGS` items). With ``more``,
    ``next_after`` is the cursor to ask the next page with (``after`` of the request)."""
    body: dict[str, Any] = {"v": VERSION, "req": req, "more": more,
                            "items": [[h.origin, h.stream, h.oldest, h.head, h.epoch]
                                      for h in items[:MAX_HOLDINGS]]}
    if more and next_after is not None:
        body["next"] = [next_after[0], next_after[1]]
    return body


def decode_holdings(body: object) -> tuple[int, list[Holding], bool, tuple[str, str] | None]:
    """Validate a ``pubsub.holdings`` body: ``(req, items, more, next)`` (``next``: the
    cursor of the following page, None when there is none or the store is a 1.0 store).

    Raises:
        ProtocolError: a field is missing or mistyped, an item is malformed, or there are
            more than :data:`MAX_HOLDINGS` items.
        UnsupportedVersion: ``v`` is not a version this build speaks.
    """
    kind = CTRL_HOLDINGS
    m = _check_map(body, kind)
    req = _req_int(m, "req", kind)
    more = m.get("more", False)
    items = m.get("items")
    if not isinstance(more, bool) or not isinstance(items, list) or len(items) > MAX_HOLDINGS:
        raise ProtocolError(f"{kind} needs items (a list of at most {MAX_HOLDINGS}) and more")
    nxt = _cursor(m, "next", kind)
    out = []
    for it in items:
        if not isinstance(it, list) or len(it) != 5:
            raise ProtocolError(f"{kind} item must be [origin, stream, oldest, head, epoch]")
        row = {"origin": it[0], "stream": it[1], "oldest": it[2], "head": it[3], "epoch": it[4]}
        origin = _origin(row, kind)
        if origin is None:
            raise ProtocolError(f"{kind} item needs an origin")
        oldest, head = _req_int(row, "oldest", kind), _req_int(row, "head", kind)
        epoch = _req_int(row, "epoch", kind)
        if oldest > head or epoch >= 1 << 32:
            raise ProtocolError(f"{kind} item has oldest > head or a bad epoch")
        out.append(Holding(origin, _str(row, "stream", kind, limit=MAX_TOPIC), oldest, head,
                           epoch))
    return req, out, more, nxt if more else None


def trim_chunk(events: list[bytes], first: int, max_bytes: int, max_event: int | None,
               skip: tuple[int, int, str] | None) -> tuple[int, tuple[int, int, str] | None]:
    """Cut a replay (or fetch) chunk to what the subscriber takes, in place.

    ``events`` start at seq ``first``. The chunk stops before the first event over
    ``max_event`` (the subscriber's own limit: it would refuse that event, and with it the
    whole chunk, forever); when that event is the first one it is skipped instead, as
    ``(seq, seq + 1, "oversize")``. The chunk also stops once ``max_bytes`` is passed, but
    always keeps one event. Returns ``(first, skip)``: ``first`` moves past a skipped event.
    """
    limit = max_event if max_event is not None else 1 << 62
    total = 0
    for i, env in enumerate(events):
        size = len(env)
        if size > limit:
            del events[i:]
            if i == 0:
                skip = (first, first + 1, "oversize")
                first += 1
            break
        total += size
        if total > max_bytes and i > 0:
            del events[i:]
            break
    return first, skip
