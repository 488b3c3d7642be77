"""Wire frames of request/reply (pure: bytes in, typed values out; no I/O).

Every message is a ZeroMQ multipart (after the ROUTER routing-id frame), in one of two forms.
The split form::

    frame 0  HEAD   5 bytes: b"ZRR1" (protocol "zeromesh request/reply", major version 1)
                    followed by one command byte: REQUEST=1 REPLY=2 PING=3 PONG=4
    frame 1  META   msgpack array (layout per command, see docs/protocol.md)
    frame 2  BODY   opaque bytes (REQUEST and REPLY only)

and the compact form, one frame: HEAD followed by msgpack ``[META, BODY]`` (REQUEST, REPLY) or
by META (PING, PONG). Since revision 1.4 a BATCH (command 5) carries several compact REQUESTs
or several compact REPLYs in one frame: HEAD followed by msgpack ``[command, [[META, BODY],
...], rev]`` (:func:`batch_frame`); it is sent only to a peer whose latest message showed
``rev`` >= :data:`BATCH_REVISION`. Senders use the compact form unless BODY is larger than
:data:`COMPACT_MAX` (where pyzmq stops copying frames); receivers accept both, told apart by
the frame count. Why: a frame costs a Python-level send and receive call on both sides, each
10-20 µs on a loaded VM once caches are cold between round trips (measured in the service's
loop: 4 sends of a split reply 38 µs), and two frames fewer per hop was the largest single cut
of request/reply latency (see BENCHMARKS.md).

Anything else is a :class:`~mesh.errors.ProtocolError`; the receiver counts it and drops it.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import msgpack

from mesh.errors import ProtocolError

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_ITEMS",
    "BATCH_REVISION",
    "COMPACT_MAX",
    "ERR_ID_REUSED",
    "ERR_NOT_CACHED",
    "ERR_OUTCOME_UNKNOWN",
    "MAX_BATCH",
    "REVISION",
    "SIGNATURE",
    "Batch",
    "Command",
    "Format",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "Status",
    "TaskState",
    "batch_frame",
    "decode",
    "decode_after_id",
    "decode_compact",
    "decode_rev",
    "encode_ping",
    "encode_pong",
    "encode_reply",
    "encode_request",
    "reply_frames",
    "request_frames",
    "revision",
    "to_split",
]

SIGNATURE = b"ZRR1"
#: The protocol revision (the minor of ZRR/1) this build speaks, sent as the last META item
#: of every message (since 1.3; docs/protocol.md, "Versions and negotiation"). Absent: the
#: sender is 1.0 (split form) or 1.1-1.2 (compact form).
REVISION = 4
#: The first revision that reads BATCH messages (1.4): a sender batches toward a peer only once
#: that peer's latest message showed at least this ``rev``.
BATCH_REVISION = 4
#: Most items a receiver accepts in one BATCH (more: the whole message is malformed).
MAX_BATCH = 1024
#: Most items and bytes zeromesh puts in one BATCH it sends (a receiver's MAXMSGSIZE bounds a
#: frame; 256 KiB is far below the 4 MiB default). 32, not more: with 64 in flight one BATCH
#: of all of them kept caller and responder in lockstep, each idle while the other worked
#: (bench/bench_reqrep_pipelined.py: 8 to 32 items beat 256 by about 1.3x).
BATCH_MAX_ITEMS = 32
BATCH_MAX_BYTES = 256 << 10
_MAX_ID = 64
_MAX_NAME = 256
_MAX_HEADERS = 64
#: Largest BODY sent in the compact (one-frame) form; larger bodies travel in their own frame
#: (pyzmq sends frames of 64 KiB and more without copying them).
COMPACT_MAX = 65536


#: Reserved ``error_type`` values of an ERROR REPLY sent by the responder itself (no handler ran
#: for this copy). Carried in the existing field so every ZRR/1 client reads them; the client
#: raises the matching :class:`~patterns.reqrep.errors.RemoteError` subclass.
#: The same caller sent the same request id with another payload: refused, never run.
ERR_ID_REUSED = "zeromesh.RequestIdReused"
#: The request ran once but its reply was too large to keep for retries: not run again.
ERR_NOT_CACHED = "zeromesh.ReplyNotCached"
#: The request was running when this responder died (its outcome log says RUNNING, no reply):
#: it may or may not have taken effect; it is not run again.
ERR_OUTCOME_UNKNOWN = "zeromesh.OutcomeUnknown"


class Command(enum.IntEnum):
    """Frame 1 of every message."""

    REQUEST = 1
    REPLY = 2
    PING = 3
    PONG = 4
    BATCH = 5  #: several compact REQUESTs or several compact REPLYs in one frame (1.4)


class Format(enum.IntEnum):
    """How BODY is to be read."""

    BYTES = 0  #: raw bytes, passed through untouched
    MSGPACK = 1  #: a msgpack value


class Status(enum.IntEnum):
    """Outcome carried by a REPLY."""

    OK = 0  #: BODY is the handler's result
    ERROR = 1  #: the handler raised; META carries type and message
    BUSY = 2  #: refused, queue full: try another responder after a backoff
    EXPIRED = 3  #: the request's deadline passed before it could start: it was never run
    UNKNOWN_SERVICE = 4  #: this responder does not offer that name


class TaskState(enum.IntEnum):
    """What a responder knows about a request id (carried by a PONG)."""

    UNKNOWN = 0  #: never seen (or expired from the cache): resend it
    RUNNING = 1  #: a handler is running it (or it is queued): keep waiting
    DONE = 2  #: a reply is cached: resend the request to get it again


# NamedTuples, not frozen dataclasses: a frozen dataclass sets each field through
# object.__setattr__ (measured about 1 µs for 7 fields), and several are built per round trip.
class Request(NamedTuple):
    """A REQUEST: META = [id, service, ttl_ms, attempt, format, headers]."""

    id: str
    service: str
    ttl_ms: int
    attempt: int
    format: Format
    headers: dict[str, str] = {}  # never mutated: decode() builds a fresh dict per message
    body: bytes = b""


class Reply(NamedTuple):
    """A REPLY: META = [id, status, free, format, error_type, error_message]."""

    id: str
    status: Status
    free: int
    format: Format
    error_type: str = ""
    error_message: str = ""
    body: bytes = b""


class Ping(NamedTuple):
    """A PING: META = [nonce, request_id or ""]."""

    nonce: int
    request_id: str = ""


class Pong(NamedTuple):
    """A PONG: META = [nonce, free, request_id, task_state]."""

    nonce: int
    free: int
    request_id: str = ""
    state: TaskState = TaskState.UNKNOWN


class Batch(NamedTuple):
    """A BATCH: ``command`` (REQUEST or REPLY) and its well-formed items, in order;
    ``malformed`` items were dropped (each counted by the receiver as garbage)."""

    command: Command
    items: list[Request | Reply]
    malformed: int = 0


_packb = msgpack.Packer(use_bin_type=True).pack
_H_BATCH = SIGNATURE + b"\x05"
_H_REQUEST = SIGNATURE + b"\x01"
_H_REPLY = SIGNATURE + b"\x02"
_H_PING = SIGNATURE + b"\x03"
_H_PONG = SIGNATURE + b"\x04"


def encode_request(req: Request) -> list[bytes]:
    """Frames of a REQUEST (without the routing id): one, or three for a large body."""
    return request_frames(req, req.ttl_ms, req.attempt)


def request_frames(req: Request, ttl_ms: int, attempt: int) -> list[bytes]:
    """Frames of ``req`` sent with this ``ttl_ms`` and ``attempt`` (a client's retries reuse
    one template instead of building a Request per send)."""
    meta = [req.id, req.service, ttl_ms, attempt, int(req.format), req.headers, REVISION]
    if len(req.body) <= COMPACT_MAX:
        return [_H_REQUEST + _packb([meta, req.body])]
    return [_H_REQUEST, _packb(meta), req.body]


def encode_reply(rep: Reply) -> list[bytes]:
    """Frames of a REPLY (without the routing id): one, or three for a large body."""
    return reply_frames(rep, rep.free)


def reply_frames(rep: Reply, free: int) -> list[bytes]:
    """Frames of ``rep`` advertising ``free`` handler slots (known only when it is sent)."""
    meta = [rep.id, int(rep.status), free, int(rep.format), rep.error_type, rep.error_message,
            REVISION]
    if len(rep.body) <= COMPACT_MAX:
        return [_H_REPLY + _packb([meta, rep.body])]
    return [_H_REPLY, _packb(meta), rep.body]


def encode_ping(ping: Ping) -> list[bytes]:
    """Frames of a PING (compact form)."""
    return [_H_PING + _packb([ping.nonce, ping.request_id, REVISION])]


def encode_pong(pong: Pong) -> list[bytes]:
    """Frames of a PONG (compact form)."""
    return [_H_PONG + _packb([pong.nonce, pong.free, pong.request_id, int(pong.state),
                              REVISION])]


def _array_head(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def batch_frame(command: Command, compact: list[bytes]) -> bytes:
    """One BATCH frame carrying these compact REQUEST (or REPLY) frames, in order.

    Built by concatenation: each compact frame's msgpack value ``[META, BODY]`` (its bytes
    after HEAD) is already a well-formed item, so nothing is packed again. The caller keeps
    to :data:`BATCH_MAX_ITEMS`, :data:`BATCH_MAX_BYTES` and one command per batch.
    """
    parts: list[bytes | memoryview] = [_H_BATCH, b"\x93", bytes((int(command),)), _array_head(len(compact))]
    for f in compact:
        parts.append(memoryview(f)[5:])
    parts.append(_packb(REVISION))
    return b"".join(parts)


def _decode_batch(frame: bytes) -> tuple[Batch, int]:
    v = _unpack(memoryview(frame)[5:])
    if type(v) is not list or len(v) < 3:
        raise ProtocolError("BATCH must be HEAD + msgpack [command, items, rev]")
    cmd, items = v[0], v[1]
    if cmd not in (1, 2) or type(cmd) is not int:
        raise ProtocolError(f"BATCH command must be REQUEST or REPLY, got {cmd!r}")
    if type(items) is not list or not 0 < len(items) <= MAX_BATCH:
        raise ProtocolError(f"BATCH items must be an array of 1..{MAX_BATCH}")
    out: list[Request | Reply] = []
    bad = 0
    for it in items:
        m = _item(cmd, it)
        if m is None:
            bad += 1
        else:
            out.append(m)
    rev = v[2]
    return (Batch(Command.REQUEST if cmd == 1 else Command.REPLY, out, bad),
            rev if type(rev) is int and rev >= 0 else 0)


def to_split(frames: list[bytes]) -> list[bytes]:
    """The split form of a message (a compact one is converted; a split one returned as is).

    A responder answers a caller that sent the split form in the split form: a 1.0 caller
    knows no other (docs/protocol.md, "Versions and negotiation").

    Raises:
        ProtocolError: a compact frame that does not decode.
    """
    if len(frames) != 1:
        return frames
    f = frames[0]
    value = _unpack(memoryview(f)[5:])
    if f[4] in (1, 2):
        if not isinstance(value, list) or len(value) != 2:
            raise ProtocolError("compact message must be HEAD + msgpack [META, BODY]")
        return [bytes(f[:5]), _packb(value[0]), value[1]]
    return [bytes(f[:5]), _packb(value)]


_META_LEN = {1: 6, 2: 6, 3: 2, 4: 4}


def _rev_of(meta: list[Any], n: int, default: int) -> int:
    rev = meta[n] if len(meta) > n else None
    return rev if type(rev) is int and rev >= 0 else default


def revision(frames: list[bytes]) -> int:
    """The protocol revision a well-formed message shows: its ``rev`` META item when present
    (the first item past the command's fields, an int), else 1 for the compact form and 0
    for the split form (1.0 knew only that). Call it on messages :func:`decode` accepted."""
    try:
        if len(frames) == 1 and frames[0][4] == 5:
            v = msgpack.unpackb(memoryview(frames[0])[5:], raw=False, strict_map_key=True)
            rev = v[2]
            return rev if type(rev) is int and rev >= 0 else 0
        if len(frames) == 1:
            v = msgpack.unpackb(memoryview(frames[0])[5:], raw=False, strict_map_key=True)
            meta = v[0] if frames[0][4] in (1, 2) else v
            compact = 1
        else:
            meta = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
            compact = 0
        n = _META_LEN[frames[0][4]]
        rev = meta[n] if len(meta) > n else None
    except Exception:
        return 0
    return rev if type(rev) is int and rev >= 0 else compact


def _unpack(raw: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"META is not msgpack: {exc}") from exc


def _meta(meta: Any, n: int) -> list[Any]:
    if not isinstance(meta, list) or len(meta) < n:
        raise ProtocolError(f"META must be an array of at least {n} items")
    return meta


def _split(frames: list[bytes], n: int, with_body: bool, what: str) -> tuple[Any, bytes]:
    """(META value, BODY) of the compact (one frame) or the split form."""
    if n == 1:
        value = _unpack(memoryview(frames[0])[5:])
        if not with_body:
            return value, b""
        if not isinstance(value, list) or len(value) != 2 or type(value[1]) is not bytes:
            raise ProtocolError(f"compact {what} must be HEAD + msgpack [META, BODY(bin)]")
        return value[0], value[1]
    if n != (3 if with_body else 2):
        raise ProtocolError(f"{what} must have 1 or {3 if with_body else 2} frames")
    return _unpack(frames[1]), frames[2] if with_body else b""


def _str(v: object, what: str, limit: int, empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > limit or (not empty and not v):
        raise ProtocolError(f"{what} must be a {'' if empty else 'non-empty '}string "
                            f"of at most {limit} chars")
    return v


def _int(v: object, what: str, lo: int = -(2**31), hi: int = 2**31) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}]")
    return v


_MEMBERS: dict[type[enum.IntEnum], dict[object, Any]] = {}


def _enum(cls: type[enum.IntEnum], v: object, what: str) -> Any:
    # a dict lookup: constructing an IntEnum by value costs about 1 µs, on the hot path
    table = _MEMBERS.get(cls)
    if table is None:
        table = _MEMBERS[cls] = {int(m): m for m in cls}
    member = table.get(v) if type(v) is int else None
    if member is None:
        raise ProtocolError(f"unknown {what} {v!r}")
    return member


# the hot decoders build their NamedTuples with tuple.__new__, skipping the generated
# Python-level __new__ (one frame less: 0.78 -> 0.57 µs for a Reply)
_tnew = tuple.__new__
_FORMATS = {int(m): m for m in Format}
_STATUSES = {int(m): m for m in Status}
_I32 = 2**31


def _fast(frame: bytes) -> tuple[Request | Reply, int] | None:
    """A well-formed compact REQUEST or REPLY and its revision, checked with inline type tests
    (2.7 -> ~1.2 µs: both ends decode one per round trip); None sends anything else to the
    checking decoder, which accepts exactly the same messages and names what is wrong with the
    others."""
    cmd = frame[4]
    if cmd > 2:
        return None
    try:
        v = msgpack.unpackb(memoryview(frame)[5:], raw=False, strict_map_key=True)
    except Exception:
        return None
    m = _item(cmd, v)
    if m is None:
        return None
    meta = v[0]
    rev = meta[6] if len(meta) > 6 else 1
    return m, rev if type(rev) is int and rev >= 0 else 1


def _item(cmd: int, v: Any) -> Request | Reply | None:
    """A compact value ``[META, BODY]`` of a REQUEST (cmd 1) or REPLY (2), or None when it is
    malformed (the same rules as the checking decoder)."""
    if type(v) is not list or len(v) != 2:
        return None
    m, body = v
    if type(m) is not list or len(m) < 6 or type(body) is not bytes:
        return None
    rid, a, b, c, d, e = m[0], m[1], m[2], m[3], m[4], m[5]
    if type(rid) is not str or not 0 < len(rid) <= _MAX_ID:
        return None
    if cmd == 1:  # [id, service, ttl_ms, attempt, format, headers]
        fmt = _FORMATS.get(d) if type(d) is int else None
        if (fmt is None or type(a) is not str or not 0 < len(a) <= _MAX_NAME
                or type(b) is not int or not -_I32 <= b <= _I32
                or type(c) is not int or not 0 <= c <= _I32
                or type(e) is not dict or len(e) > _MAX_HEADERS
                or (e and not all(type(k) is str and type(x) is str for k, x in e.items()))):
            return None
        return _tnew(Request, (rid, a, b, c, fmt, e, body))
    # REPLY: [id, status, free, format, error_type, error_message]
    status = _STATUSES.get(a) if type(a) is int else None
    fmt = _FORMATS.get(c) if type(c) is int else None
    if (status is None or fmt is None or type(b) is not int or not -_I32 <= b <= _I32
            or type(d) is not str or len(d) > _MAX_NAME
            or type(e) is not str or len(e) > 1 << 16):
        return None
    return _tnew(Reply, (rid, status, b, fmt, d, e, body))


Message = Request | Reply | Ping | Pong | Batch


def decode_compact(frame: bytes) -> tuple[Request | Reply, int] | None:
    """A well-formed compact REQUEST or REPLY frame and its revision, or None for anything
    else (then :func:`decode` decides, and names what is wrong): the receivers' hot path."""
    if len(frame) > 5 and frame.startswith(SIGNATURE):
        return _fast(frame)
    return None


def decode_after_id(msg: list[bytes]) -> tuple[Message, int]:
    """:func:`decode_rev` of a received message whose first frame is a routing id: the
    compact fast path (:func:`decode_compact`) when it applies, the full decoder otherwise.

    Raises:
        ProtocolError: as :func:`decode_rev`.
    """
    got = decode_compact(msg[1]) if len(msg) == 2 else None
    if got is not None:  # a well-formed compact REQUEST or REPLY, as decode_rev checks
        return got
    return decode_rev(msg[1:])


def decode(frames: list[bytes]) -> Message:
    """Decode one message (routing id already removed).

    Raises:
        ProtocolError: wrong signature, unknown command, wrong frame count or malformed META
            (for a BATCH: its layout; a malformed item only drops that item, see
            :class:`Batch`).
    """
    return decode_rev(frames)[0]


def decode_rev(frames: list[bytes]) -> tuple[Message, int]:
    """:func:`decode` and the revision the message shows (see :func:`revision`).

    Raises:
        ProtocolError: as :func:`decode`.
    """
    n = len(frames)
    if n == 1:
        f = frames[0]
        if len(f) > 5 and f.startswith(SIGNATURE):
            fast = _fast(f)
            if fast is not None:
                return fast
            if f[4] == 5:
                return _decode_batch(f)
    m = _decode(frames, n)
    return m, revision(frames)


def _decode(frames: list[bytes], n: int) -> Request | Reply | Ping | Pong:
    head = frames[0] if n else b""
    # the split form's HEAD is exactly 5 bytes; the compact form's carries META after them
    if len(head) < 5 or head[:4] != SIGNATURE or (n > 1 and len(head) != 5):
        raise ProtocolError("not a zeromesh request/reply message (signature ZRR1)")
    cmd = head[4]
    if cmd == 1:
        raw, body = _split(frames, n, True, "REQUEST")
        m = _meta(raw, 6)
        headers = m[5]
        if not isinstance(headers, dict) or len(headers) > _MAX_HEADERS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ProtocolError("REQUEST headers must be a map of strings")
        return Request(
            _str(m[0], "request id", _MAX_ID), _str(m[1], "service", _MAX_NAME),
            _int(m[2], "ttl_ms"), _int(m[3], "attempt", 0), _enum(Format, m[4], "format"),
            headers, body,
        )
    if cmd == 2:
        raw, body = _split(frames, n, True, "REPLY")
        m = _meta(raw, 6)
        return Reply(
            _str(m[0], "request id", _MAX_ID), _enum(Status, m[1], "status"),
            _int(m[2], "free"), _enum(Format, m[3], "format"),
            _str(m[4], "error type", _MAX_NAME, empty=True),
            _str(m[5], "error message", 1 << 16, empty=True), body,
        )
    if cmd == 3:
        m = _meta(_split(frames, n, False, "PING")[0], 2)
        return Ping(_int(m[0], "nonce", 0, 2**63), _str(m[1], "request id", _MAX_ID, empty=True))
    if cmd == 4:
        m = _meta(_split(frames, n, False, "PONG")[0], 4)
        return Pong(_int(m[0], "nonce", 0, 2**63), _int(m[1], "free"),
                    _str(m[2], "request id", _MAX_ID, empty=True),
                    _enum(TaskState, m[3], "task state"))
    raise ProtocolError(f"unknown command {cmd!r}")
