"""The control channel's frame codec: pure functions, no I/O.

A control message on the wire (see docs/protocol.md) is a ZeroMQ multipart message
of 2N frames, N >= 1, sent by a peer's DEALER to our ROUTER: N (header, body) pairs, so that many
small messages to one peer travel as one multipart (one syscall batch, one ROUTER receive)::

    header = b"ZM" | major:u8 | kind-length:u8 | kind:utf-8   (4 + len(kind) bytes)
    body   = msgpack (any value; the kind says what it means)

The header is binary so that the version and kind are read without a msgpack call; the 2-byte
signature makes a stray non-zeromesh sender recognisable at the first frame.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.errors import FrameTooLarge, ProtocolError, UnsupportedProtocol
from mesh.peers import OFFER_KINDS, PROTOCOL_VERSION, PeerInfo

__all__ = [
    "BYE",
    "CORE_KINDS",
    "DIGEST",
    "GOSSIP",
    "HELLO",
    "MAX_KIND_LEN",
    "PING",
    "PONG",
    "REVISION",
    "SIGNATURE",
    "SUPPORTED_VERSIONS",
    "UPDATE",
    "Digest",
    "Hello",
    "Message",
    "decode_frames",
    "decode_header",
    "digest_from_wire",
    "digest_to_wire",
    "encode_body",
    "encode_frames",
    "encode_header",
    "gossip_from_wire",
    "gossip_to_wire",
    "hello_from_wire",
    "hello_to_wire",
    "peerinfo_from_wire",
    "peerinfo_to_wire",
    "validate_kind",
]

SIGNATURE = b"ZM"
SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)
#: The revision of the control bodies this build writes (docs/protocol.md, "Frame versions").
#: 1.1 added ``info.inc`` (the sender's incarnation) to HELLO and UPDATE; 1.2 added the HELLO
#: key ``rev`` (this revision) and the kind ``digest``, sent only to peers whose ``rev`` is 1.2+;
#: 1.3 added the bucket fields of ``digest`` (``s``, ``b``, ``k``, ``w``), sent only to peers
#: whose ``rev`` is 1.3+.
REVISION = (PROTOCOL_VERSION, 3)
MAX_KIND_LEN = 64

HELLO = "hello"
UPDATE = "update"
PING = "ping"
PONG = "pong"
GOSSIP = "gossip"
DIGEST = "digest"
BYE = "bye"
#: Kinds the node core handles itself; pattern kinds must contain a dot ("pubsub.replay_req").
CORE_KINDS = frozenset({HELLO, UPDATE, PING, PONG, GOSSIP, DIGEST, BYE})

_KIND_RE = re.compile(r"^[a-z0-9_][a-z0-9_.\-]{0,63}$")
_NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def validate_kind(kind: str) -> str:
    """Check a message kind: 1-64 chars of ``[a-z0-9_.-]``, not starting with ``.`` or ``-``.

    Raises:
        ProtocolError: the kind is not valid.
    """
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ProtocolError(f"invalid control message kind {kind!r}")
    return kind


@functools.lru_cache(maxsize=1024)
def encode_header(kind: str, version: int = PROTOCOL_VERSION) -> bytes:
    """The header frame of a message of ``kind`` (cached: kinds are few).

    Raises:
        ProtocolError: the kind is not valid.
    """
    raw = validate_kind(kind).encode("ascii")
    return SIGNATURE + bytes((version, len(raw))) + raw


def decode_header(frame: bytes) -> str:
    """Return the kind of a header frame (memoised: a node sees few distinct headers).

    Raises:
        ProtocolError: not a zeromesh header (signature, length, or kind charset).
        UnsupportedProtocol: the major version is not one this build speaks.
    """
    if len(frame) <= 4 + MAX_KIND_LEN:
        return _decode_header_cached(bytes(frame))
    return _decode_header(frame)


@functools.lru_cache(maxsize=4096)
def _decode_header_cached(frame: bytes) -> str:
    return _decode_header(frame)


def _decode_header(frame: bytes) -> str:
    """Return the kind of a header frame.

    Raises:
        ProtocolError: not a zeromesh header (signature, length, or kind charset).
        UnsupportedProtocol: the major version is not one this build speaks.
    """
    if len(frame) < 5 or frame[:2] != SIGNATURE:
        raise ProtocolError(f"not a zeromesh control header: {bytes(frame[:8])!r}")
    version, length = frame[2], frame[3]
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedProtocol(version, SUPPORTED_VERSIONS)
    if length != len(frame) - 4:
        raise ProtocolError(f"header kind length {length} != {len(frame) - 4}")
    try:
        kind = bytes(frame[4:]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("header kind is not ascii") from exc
    return validate_kind(kind)


def encode_body(body: object, max_bytes: int) -> bytes:
    """msgpack-encode a body, refusing what the peer's MAXMSGSIZE would cut.

    Raises:
        ProtocolError: the body is not msgpack-serializable.
        FrameTooLarge: the encoded body exceeds ``max_bytes``.
    """
    try:
        raw: bytes = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"control body is not msgpack-serializable: {exc}") from exc
    if len(raw) > max_bytes:
        raise FrameTooLarge(len(raw), max_bytes)
    return raw


def encode_frames(messages: Iterable[tuple[str, bytes]]) -> list[bytes]:
    """Frames of one multipart carrying ``(kind, encoded body)`` pairs."""
    frames: list[bytes] = []
    for kind, body in messages:
        frames.append(encode_header(kind))
        frames.append(body)
    return frames


@dataclass(frozen=True)
class Message:
    """One decoded control message, or the reason it was dropped (``error`` set)."""

    kind: str
    body: Any
    error: ProtocolError | None = None


def decode_frames(frames: Sequence[bytes]) -> list[Message]:
    """Decode the (header, body) pairs of one multipart (sender identity already removed).

    A bad pair yields a :class:`Message` with ``error`` set and does not spoil the others.

    Raises:
        ProtocolError: the frame count is zero or odd (the whole multipart is unusable).
    """
    if not frames or len(frames) % 2:
        raise ProtocolError(f"control message has {len(frames)} frames; expected an even count")
    out: list[Message] = []
    for i in range(0, len(frames), 2):
        try:
            kind = decode_header(frames[i])
        except ProtocolError as exc:
            out.append(Message("", None, exc))
            continue
        try:
            body = msgpack.unpackb(frames[i + 1], raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, ...)
            out.append(Message(kind, None, ProtocolError(f"{kind}: undecodable body: {exc}")))
            continue
        out.append(Message(kind, body))
    return out


# --- typed bodies ------------------------------------------------------------------------------


def peerinfo_to_wire(info: PeerInfo) -> dict[str, Any]:
    """The msgpack map of a :class:`PeerInfo` (HELLO / UPDATE body field ``info``)."""
    return {
        "node_id": info.node_id,
        "name": info.name,
        "mesh": info.mesh,
        "version": info.version,
        "host": info.host,
        "endpoints": {k: list(v) for k, v in info.endpoints.items()},
        "offers": {k: list(v) for k, v in info.offers.items()},
        "public_key": info.public_key,
        "inc": info.incarnation,
    }


def _str_tuple_map(obj: object, field: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(obj, Mapping):
        raise ProtocolError(f"{field} must be a map")
    out: dict[str, tuple[str, ...]] = {}
    for key, values in obj.items():
        if not isinstance(key, str) or not isinstance(values, list | tuple):
            raise ProtocolError(f"{field} must map strings to lists")
        if not all(isinstance(v, str) for v in values):
            raise ProtocolError(f"{field}[{key!r}] must hold strings")
        out[key] = tuple(values)
    return out


def _check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str) or not _NODE_ID_RE.match(node_id):
        raise ProtocolError(f"invalid node id {node_id!r}")
    return node_id


def peerinfo_from_wire(obj: object) -> PeerInfo:
    """Validate and build a :class:`PeerInfo` from its msgpack map.

    Raises:
        ProtocolError: a field is missing or of the wrong type.
        UnsupportedProtocol: the peer speaks a major version this build does not.
    """
    if not isinstance(obj, Mapping):
        raise ProtocolError("peer info must be a map")
    node_id = _check_node_id(obj.get("node_id"))
    name, mesh, host = obj.get("name"), obj.get("mesh"), obj.get("host", "")
    version, public_key = obj.get("version"), obj.get("public_key")
    if not isinstance(name, str) or not isinstance(mesh, str) or not isinstance(host, str):
        raise ProtocolError("peer info name, mesh and host must be strings")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("peer info version must be an integer")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedProtocol(version, SUPPORTED_VERSIONS)
    if public_key is not None and not isinstance(public_key, str):
        raise ProtocolError("peer info public_key must be a string or nil")
    inc = obj.get("inc", 0)
    if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 1 << 63:
        raise ProtocolError("peer info inc must be an integer 0 .. 2**63-1")
    offers = _str_tuple_map(obj.get("offers", {}), "offers")
    unknown = set(offers) - set(OFFER_KINDS)
    if unknown:
        # A newer peer may offer new kinds: keep what we understand, do not refuse the peer.
        offers = {k: v for k, v in offers.items() if k in OFFER_KINDS}
    return PeerInfo(
        node_id=node_id,
        name=name,
        mesh=mesh,
        version=version,
        host=host,
        endpoints=_str_tuple_map(obj.get("endpoints", {}), "endpoints"),
        offers=offers,
        public_key=public_key,
        incarnation=inc,
    )


@dataclass(frozen=True)
class Hello:
    """A HELLO body: the sender's info, and the dial handshake tokens.

    Attributes:
        info: the sender's full self-description.
        dial: token of the sender's DEALER when it was dialled without knowing our node id
            (a static peer or seed endpoint); we echo it in ``ack``.
        ack: the ``dial`` token of the HELLO this one answers.
        reply: True when this HELLO answers one (the receiver must not answer it again).
        proof: the sender's connection proof for the receiver (16 bytes, HMAC of a secret the
            sending process holds over the receiver's node id; nil when the sender does not
            know who it dialled). The same process sends the same proof to one receiver on
            every connection, and no other receiver ever sees it: it lets a new connection of
            a live node take over at once (docs/protocol.md, "Connections and node ids").
        rev: the control revision the sender writes and reads (major, minor), since 1.2;
            None when absent (an older build: it gets full gossip, never ``digest``). A
            HELLO this build writes carries :data:`REVISION` unless told otherwise.
    """

    info: PeerInfo
    dial: int | None = None
    ack: int | None = None
    reply: bool = False
    proof: bytes | None = None
    rev: tuple[int, int] | None = REVISION


def hello_to_wire(hello: Hello) -> dict[str, Any]:
    """The msgpack map of a HELLO / UPDATE body (``rev`` left out when None)."""
    out: dict[str, Any] = {
        "info": peerinfo_to_wire(hello.info),
        "dial": hello.dial,
        "ack": hello.ack,
        "reply": hello.reply,
        "proof": hello.proof,
    }
    if hello.rev is not None:
        out["rev"] = list(hello.rev)
    return out


def hello_from_wire(obj: object) -> Hello:
    """Validate a HELLO / UPDATE body.

    Raises:
        ProtocolError: malformed body.
        UnsupportedProtocol: the peer speaks an unknown major version.
    """
    if not isinstance(obj, Mapping):
        raise ProtocolError("hello body must be a map")
    dial, ack, reply = obj.get("dial"), obj.get("ack"), obj.get("reply", False)
    for name, value in (("dial", dial), ("ack", ack)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ProtocolError(f"hello {name} must be an integer or nil")
    if not isinstance(reply, bool):
        raise ProtocolError("hello reply must be a boolean")
    proof = obj.get("proof")
    if proof is not None and (not isinstance(proof, bytes) or not 8 <= len(proof) <= 64):
        raise ProtocolError("hello proof must be 8-64 bytes or nil")
    rev = obj.get("rev")
    if rev is not None:
        if (not isinstance(rev, list) or len(rev) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 16
                           for v in rev)):
            raise ProtocolError("hello rev must be an array of two integers 0 .. 65535 or nil")
        rev = (rev[0], rev[1])
    return Hello(peerinfo_from_wire(obj.get("info")), dial, ack, reply, proof, rev)


#: One gossip entry: (node_id, mesh, host, control endpoints, CURVE public key or None).
#: A 6th element on the wire (the incarnation, control revision 1.1) is accepted and not
#: kept: gossip only leads to a dial, and the HELLO that answers it carries the incarnation.
GossipEntry = tuple[str, str, str, tuple[str, ...], str | None]


def gossip_to_wire(entries: Iterable[GossipEntry]) -> list[list[Any]]:
    """The msgpack array of a GOSSIP body."""
    return [[node_id, mesh, host, list(eps), key] for node_id, mesh, host, eps, key in entries]


def gossip_from_wire(obj: object) -> tuple[list[GossipEntry], int]:
    """Decode a GOSSIP body; return the valid entries and the number of bad ones skipped.

    An entry has 5 elements (the key may be nil); a 4-element entry (no key) is accepted, and
    a 6-element one (the sender's view of the node's incarnation, an int; not kept).

    Raises:
        ProtocolError: the body is not an array.
    """
    if not isinstance(obj, list):
        raise ProtocolError("gossip body must be an array")
    good: list[GossipEntry] = []
    bad = 0
    for item in obj:
        try:
            if not isinstance(item, list) or len(item) not in (4, 5, 6):
                raise ProtocolError("gossip entry must be an array of 4 to 6 elements")
            node_id, mesh, host, eps = item[:4]
            key = item[4] if len(item) >= 5 else None
            if len(item) == 6 and (not isinstance(item[5], int) or isinstance(item[5], bool)):
                raise ProtocolError("gossip incarnation must be an integer")
            _check_node_id(node_id)
            if not isinstance(mesh, str) or not isinstance(host, str):
                raise ProtocolError("gossip mesh/host must be strings")
            if not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
                raise ProtocolError("gossip endpoints must be strings")
            if key is not None and not isinstance(key, str):
                raise ProtocolError("gossip key must be a string or nil")
            good.append((node_id, mesh, host, tuple(eps), key))
        except (ProtocolError, TypeError, ValueError):
            bad += 1
    return good, bad


#: Most buckets one ``digest`` exchange may use (mesh.gossip.MAX_BUCKETS).
MAX_BUCKETS = 1024


@dataclass(frozen=True)
class Digest:
    """A ``digest`` body (since control revision 1.2): the sender's view in 8 bytes, and
    since 1.3 the two steps of a bucket reconciliation.

    Attributes:
        digest: blake2b-8 of the node ids the sender would gossip, and its own
            (:func:`mesh.gossip.digest`).
        count: how many ids that view holds (informational).
        pull: True when the sender asks for the receiver's full list (it saw the receiver's
            digest differ); the receiver answers with ``gossip`` and compares nothing. True
            as well in the two bucket steps below (they ask for entries too), where the
            bucket fields decide the answer.
        salt: the exchange's salt (8 bytes), with ``buckets`` or ``want`` (1.3).
        buckets: the sender's bucket hashes (4 bytes per bucket, :func:`mesh.gossip.buckets`),
            sent instead of a full list when it saw the receiver's digest differ: the
            receiver answers with its entries of the buckets whose hashes differ and a want
            of the same buckets (1.3).
        k: the bucket count of a want (with ``buckets`` it is ``len(buckets) // 4``).
        want: bucket indices whose entries the sender asks for (the answer to ``buckets``);
            the receiver answers with its entries of them and nothing more (1.3).
    """

    digest: bytes
    count: int
    pull: bool = False
    salt: bytes | None = None
    buckets: bytes | None = None
    k: int = 0
    want: tuple[int, ...] | None = None


def digest_to_wire(d: Digest) -> dict[str, Any]:
    """The msgpack map of a ``digest`` body (the bucket keys only when set)."""
    out: dict[str, Any] = {"d": d.digest, "n": d.count, "pull": d.pull}
    if d.buckets is not None:
        out["s"] = d.salt
        out["b"] = d.buckets
    elif d.want is not None:
        out["s"] = d.salt
        out["k"] = d.k
        out["w"] = list(d.want)
    return out


def _int_in(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def digest_from_wire(obj: object) -> Digest:
    """Validate a ``digest`` body.

    Raises:
        ProtocolError: not a map, ``d`` not 8 bytes, ``n`` not an integer 0 .. 2**32-1,
            ``pull`` not a boolean; or (1.3) both ``b`` and ``w``, ``s`` not 8 bytes with
            either, ``b`` not 4 to 4096 bytes in fours, ``k`` not 1 .. 1024, ``w`` not an
            array of distinct integers 0 .. k-1.
    """
    if not isinstance(obj, Mapping):
        raise ProtocolError("digest body must be a map")
    d, n, pull = obj.get("d"), obj.get("n", 0), obj.get("pull", False)
    if not isinstance(d, bytes) or len(d) != 8:
        raise ProtocolError("digest d must be 8 bytes")
    if not _int_in(n, 0, (1 << 32) - 1):
        raise ProtocolError("digest n must be an integer 0 .. 2**32-1")
    if not isinstance(pull, bool):
        raise ProtocolError("digest pull must be a boolean")
    b, w = obj.get("b"), obj.get("w")
    if b is None and w is None:
        return Digest(d, n, pull)
    if b is not None and w is not None:
        raise ProtocolError("digest cannot carry both b and w")
    salt = obj.get("s")
    if not isinstance(salt, bytes) or len(salt) != 8:
        raise ProtocolError("digest s must be 8 bytes with b or w")
    if b is not None:
        if (not isinstance(b, bytes) or not b or len(b) % 4
                or len(b) // 4 > MAX_BUCKETS):
            raise ProtocolError(f"digest b must be 4 .. {4 * MAX_BUCKETS} bytes, in fours")
        return Digest(d, n, pull, salt, b, len(b) // 4)
    k = obj.get("k")
    if not _int_in(k, 1, MAX_BUCKETS):
        raise ProtocolError(f"digest k must be an integer 1 .. {MAX_BUCKETS} with w")
    assert isinstance(k, int)
    if (not isinstance(w, list) or len(w) > k or not all(_int_in(i, 0, k - 1) for i in w)
            or len(set(w)) != len(w)):
        raise ProtocolError("digest w must be an array of distinct bucket indices 0 .. k-1")
    return Digest(d, n, pull, salt, None, k, tuple(w))
