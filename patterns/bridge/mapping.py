"""Pure mapping between mesh events and broker messages (no I/O).

Three concerns, all pure functions so they are tested without a broker:

* **Names.** A :class:`Route` pairs a mesh stream pattern with an MQTT topic filter or a NATS
  subject filter. Mesh streams are dot-separated; patterns use ``*`` (one token) and ``>`` (the
  rest, last only). MQTT uses ``/`` with ``+`` and ``#``; NATS uses ``.`` with ``*`` and ``>``.
  The wildcards of the two sides correspond in order, so ``sensors.*.temp`` <->
  ``site/+/temp`` maps ``sensors.k1.temp`` to ``site/k1/temp`` and back.
* **Envelope.** An :class:`~mesh.envelope.Event` becomes a payload plus string attributes
  (MQTT 5 user properties or NATS headers) in *binary* mode, or one CloudEvents JSON document in
  *structured* mode; and back. The layout is specified in docs/protocol.md. MQTT follows the
  CloudEvents MQTT protocol binding v1.0.2 (user properties named as the attributes, values
  their canonical strings, unencoded UTF-8; ``datacontenttype`` in the Content Type property).
  The published NATS binding (v1.0.2) knows only structured mode, which is why a NATS bridge
  defaults to it; NATS binary mode follows the binding's working draft (1.0.3-wip): ``ce-``
  headers with percent-encoded values, ``datacontenttype`` as ``ce-datacontenttype``.
* **Loops.** Every event a bridge sends out carries ``bridgeorigin`` (the bridge's origin id);
  every event it brings in is stamped with it too. :class:`LoopGuard` also remembers the ids it
  sent, so an event coming back is recognised by origin or by id.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import msgpack

from mesh.envelope import Event, from_cloudevent, to_cloudevent, to_cloudevent_json
from mesh.errors import CodecError, ConfigError, MalformedEvent

__all__ = [
    "DEFAULT_MODE",
    "ORIGIN_ATTR",
    "STRUCTURED_CONTENT_TYPE",
    "LoopGuard",
    "Message",
    "Route",
    "event_to_message",
    "is_structured",
    "message_to_event",
    "origin_of",
    "percent_decode",
    "percent_encode",
    "safe_message_to_event",
    "split_pattern",
]

Kind = Literal["mqtt", "nats"]
Mode = Literal["binary", "structured"]
Direction = Literal["out", "in", "both"]

#: Extension attribute naming the bridge an event crossed (loop prevention).
ORIGIN_ATTR = "bridgeorigin"
#: Content type of a structured-mode message (CloudEvents JSON format).
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
#: NATS header prefix of CloudEvents attributes (CloudEvents NATS binding, 1.0.3-wip draft).
NATS_PREFIX = "ce-"
#: Default CloudEvents content mode per broker kind: binary for MQTT 5 (the published MQTT
#: binding has it); structured for NATS (the published NATS binding, v1.0.2, has only
#: structured mode; binary mode exists only in its 1.0.3-wip draft).
DEFAULT_MODE: dict[str, Mode] = {"mqtt": "binary", "nats": "structured"}
#: Attribute flagging how a non-bytes ``data`` was serialised in binary mode.
DATAENC_ATTR = "meshdataenc"

_SEP = {"mqtt": "/", "nats": "."}
_ONE = {"mqtt": "+", "nats": "*"}
_REST = {"mqtt": "#", "nats": ">"}


# --- names --------------------------------------------------------------------------------------


def split_pattern(pattern: str, kind: Kind | Literal["mesh"]) -> list[str]:
    """Split a stream/topic/subject pattern into tokens and check its wildcards.

    Raises:
        ConfigError: empty pattern or token, or a multi-level wildcard not in last place.
    """
    if not pattern:
        raise ConfigError("an empty pattern")
    sep = "/" if kind == "mqtt" else "."
    rest = "#" if kind == "mqtt" else ">"
    tokens = pattern.split(sep)
    for i, t in enumerate(tokens):
        if t == "" and kind != "mqtt":
            raise ConfigError(f"empty token in {pattern!r}")
        if t == rest and i != len(tokens) - 1:
            raise ConfigError(f"{rest!r} must be the last token of {pattern!r}")
    return tokens


def _wildcards(tokens: list[str], one: str, rest: str) -> list[str]:
    return [t for t in tokens if t in (one, rest)]


def _match(tokens: list[str], name_tokens: list[str], one: str, rest: str) -> list[Any] | None:
    """Captured values (a str per ``one``, a list per ``rest``) or None when no match."""
    caps: list[Any] = []
    for i, t in enumerate(tokens):
        if t == rest:
            tail = name_tokens[i:]
            if not tail:
                return None
            caps.append(tail)
            return caps
        if i >= len(name_tokens):
            return None
        if t == one:
            caps.append(name_tokens[i])
        elif t != name_tokens[i]:
            return None
    return caps if len(tokens) == len(name_tokens) else None


def _fill(tokens: list[str], caps: list[Any], one: str, rest: str) -> list[str] | None:
    out: list[str] = []
    it = iter(caps)
    for t in tokens:
        if t == one:
            v = next(it)
            if not isinstance(v, str):
                return None
            out.append(v)
        elif t == rest:
            v = next(it)
            out.extend(v if isinstance(v, list) else [v])
        else:
            out.append(t)
    return out


@dataclass(frozen=True)
class Route:
    """One mapping between mesh streams and broker topics/subjects.

    Attributes:
        mesh: mesh stream pattern (``.``-separated; ``*`` one token, ``>`` the rest).
        remote: MQTT topic filter (``+``/``#``) or NATS subject filter (``*``/``>``).
        direction: ``"out"`` (mesh to broker), ``"in"`` (broker to mesh) or ``"both"``.
        kind: ``"mqtt"`` or ``"nats"``.
    """

    mesh: str
    remote: str
    direction: Direction = "out"
    kind: Kind = "mqtt"

    def __post_init__(self) -> None:
        if self.direction not in ("out", "in", "both"):
            raise ConfigError(f"direction must be out, in or both, got {self.direction!r}")
        if self.kind not in ("mqtt", "nats"):
            raise ConfigError(f"kind must be mqtt or nats, got {self.kind!r}")
        m = _wildcards(split_pattern(self.mesh, "mesh"), "*", ">")
        r = _wildcards(split_pattern(self.remote, self.kind), _ONE[self.kind], _REST[self.kind])
        kinds_m = ["one" if w == "*" else "rest" for w in m]
        kinds_r = ["one" if w == _ONE[self.kind] else "rest" for w in r]
        if kinds_m != kinds_r:
            raise ConfigError(
                f"route {self.mesh!r} <-> {self.remote!r}: the wildcards must correspond in "
                f"order and kind ({m} vs {r})")

    @property
    def outbound(self) -> bool:
        """Mesh to broker."""
        return self.direction in ("out", "both")

    @property
    def inbound(self) -> bool:
        """Broker to mesh."""
        return self.direction in ("in", "both")

    def subscription_prefix(self) -> str:
        """The mesh subscriber topic covering :attr:`mesh` (exact name, or a prefix + ``.``)."""
        tokens = split_pattern(self.mesh, "mesh")
        lit: list[str] = []
        for t in tokens:
            if t in ("*", ">"):
                return ".".join(lit) + "." if lit else "*"
            lit.append(t)
        return self.mesh

    def to_remote(self, stream: str) -> str | None:
        """The broker topic/subject of mesh ``stream``, or None when the route does not cover it."""
        caps = _match(split_pattern(self.mesh, "mesh"), stream.split("."), "*", ">")
        if caps is None:
            return None
        out = _fill(split_pattern(self.remote, self.kind), caps, _ONE[self.kind],
                    _REST[self.kind])
        return None if out is None else _SEP[self.kind].join(out)

    def to_mesh(self, remote: str) -> str | None:
        """The mesh stream of broker topic/subject ``remote``, or None when not covered."""
        caps = _match(split_pattern(self.remote, self.kind), remote.split(_SEP[self.kind]),
                      _ONE[self.kind], _REST[self.kind])
        if caps is None:
            return None
        out = _fill(split_pattern(self.mesh, "mesh"), caps, "*", ">")
        if out is None or any(t == "" for t in out):
            return None  # an empty MQTT level cannot become a mesh token
        return ".".join(out)


# --- envelope ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A broker-side message, independent of the client library.

    Attributes:
        topic: MQTT topic or NATS subject.
        payload: the body.
        attrs: MQTT 5 user properties or NATS headers, in order (names as on the wire).
        content_type: the MQTT 5 Content Type property (NATS: the ``content-type`` header).
    """

    topic: str
    payload: bytes
    attrs: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None


# Printable ASCII but space, double-quote and percent: what a NATS header value keeps as is
# (CloudEvents NATS binding 1.0.3-wip, 3.1.3.2, the same rule as the HTTP binding's).
_HDR_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}
_PCT_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def percent_encode(value: str) -> str:
    """A CloudEvents attribute value as a NATS header value (percent-encoded UTF-8).

    Space, ``"``, ``%`` and every character outside U+0021-U+007E become ``%XY`` per UTF-8
    byte (upper-case hex); the rest is kept.

    Raises:
        MalformedEvent: ``value`` holds a lone surrogate (not encodable as UTF-8).
    """
    if all(c in _HDR_SAFE for c in value):
        return value
    try:
        return "".join(c if c in _HDR_SAFE else "".join(f"%{b:02X}" for b in c.encode())
                       for c in value)
    except UnicodeEncodeError as exc:
        raise MalformedEvent(f"attribute value is not valid Unicode: {exc}") from exc


def percent_decode(name: str, value: str) -> str:
    """The attribute value of a NATS header: quoted-string unescaped, then one round of
    percent-decoding (lower-case hex accepted); the bytes must be valid UTF-8.

    Raises:
        MalformedEvent: a ``%`` not followed by two hex digits, or bytes that are not UTF-8
            (an overlong form such as ``%C0%A0`` included).
    """
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])  # RFC 7230 3.2.6 quoted-string
    if "%" not in value:
        return value
    if _PCT_BAD.search(value):
        raise MalformedEvent(f"{name}: a '%' not followed by two hex digits in {value!r:.60}",
                             field=name)
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEvent(f"{name}: percent-decoded bytes are not UTF-8: {exc}",
                             field=name) from exc


def _attr(kind: Kind, name: str, value: str) -> tuple[str, str]:
    if kind == "nats":
        return NATS_PREFIX + name, percent_encode(value)
    return name, value


def event_to_message(ev: Event, topic: str, *, kind: Kind, mode: Mode, origin: str,
                     extra_attrs: Mapping[str, str] | None = None) -> Message:
    """Map ``ev`` to a broker message on ``topic`` stamped with ``origin``.

    Binary mode: ``data`` is the payload (bytes as is; other values as JSON, or msgpack when
    not JSON-able, flagged by ``meshdataenc``); every other attribute is a user property
    (MQTT: name as is, value unencoded UTF-8) or a header (NATS: ``ce-`` prefix, value
    percent-encoded); ``datacontenttype`` is the MQTT Content Type property, or the NATS
    ``ce-datacontenttype`` header (no ``content-type`` header: that one marks structured mode).
    Structured mode: the payload is the CloudEvents JSON document and the content type
    ``application/cloudevents+json``; only the id and origin are repeated as attributes.

    Raises:
        MalformedEvent: the event holds a value that cannot be encoded.
    """
    ev = ev if ev.extras.get(ORIGIN_ATTR) == origin else ev.replace(
        extras={**ev.extras, ORIGIN_ATTR: origin})
    attrs: list[tuple[str, str]] = []
    if mode == "structured":
        try:
            payload = to_cloudevent_json(ev).encode()
        except UnicodeEncodeError as exc:  # a lone surrogate in data
            raise MalformedEvent(f"event cannot be encoded: {exc}") from exc
        attrs.append(_attr(kind, "id", ev.id))
        attrs.append(_attr(kind, ORIGIN_ATTR, origin))
        ctype: str | None = STRUCTURED_CONTENT_TYPE
    else:
        ce = to_cloudevent(ev)
        ctype = ce.pop("datacontenttype", None)
        attrs.append(_attr(kind, "specversion", "1.0"))
        if kind == "nats" and ctype is not None:
            attrs.append(_attr(kind, "datacontenttype", ctype))
            ctype = None
        data = ev.data
        ce.pop("data", None)
        ce.pop("data_base64", None)
        if ce.pop(DATAENC_ATTR, None) is not None:
            pass  # recomputed below from the value itself
        if isinstance(data, bytes):
            payload = data
        elif data is None:
            payload = b""
            attrs.append(_attr(kind, DATAENC_ATTR, "none"))
        else:
            try:
                payload = json.dumps(data, ensure_ascii=False, allow_nan=False,
                                     separators=(",", ":")).encode()
                enc = "json"
            except (TypeError, ValueError):  # UnicodeEncodeError included: msgpack says why
                try:
                    payload = msgpack.packb(data, use_bin_type=True)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise MalformedEvent(f"data cannot be encoded: {exc}") from exc
                enc = "msgpack"
            attrs.append(_attr(kind, DATAENC_ATTR, enc))
        for k, v in ce.items():
            if k == "specversion":
                continue
            # Canonical string forms (CloudEvents type system): Boolean "true"/"false",
            # Integer its decimal digits.
            attrs.append(_attr(kind, k, v if isinstance(v, str) else json.dumps(v)))
    if kind == "nats" and ctype is not None:
        attrs.append(("content-type", ctype))  # structured mode only (see above)
    if extra_attrs:
        attrs.extend(extra_attrs.items())
    return Message(topic, payload, tuple(attrs), ctype)


def _plain_attrs(msg: Message, kind: Kind, *, strict: bool = True) -> dict[str, str]:
    """The CloudEvents attributes a message carries, by name, values decoded.

    NATS: the ``ce-`` headers (names case-insensitive), percent-decoded; with ``strict``
    False a value that does not decode is left out instead of raising.
    """
    out: dict[str, str] = {}
    for k, v in msg.attrs:
        if kind == "nats":
            lk = k.lower()
            if not lk.startswith(NATS_PREFIX):
                continue
            name = lk[len(NATS_PREFIX):]
            try:
                out[name] = percent_decode(name, v)
            except MalformedEvent:
                if strict:
                    raise
        else:
            out[k] = v
    return out


def is_structured(msg: Message) -> bool:
    """True when the message declares the CloudEvents JSON format."""
    return (msg.content_type or "").split(";")[0].strip().lower() == STRUCTURED_CONTENT_TYPE


def origin_of(msg: Message, kind: Kind) -> tuple[str | None, str | None]:
    """The (event id, bridge origin) a message carries in its attributes, if any."""
    a = _plain_attrs(msg, kind, strict=False)
    return a.get("id"), a.get(ORIGIN_ATTR)


def message_to_event(msg: Message, *, kind: Kind, origin: str) -> Event:
    """Map a broker message back to an Event, stamped with ``origin``.

    A message with CloudEvents attributes (``specversion``) or the structured content type must
    be a valid CloudEvent; a message with neither (a plain MQTT/NATS publisher) is wrapped: a new
    id, ``type`` ``"<kind>.message"``, ``source`` ``"<kind>:<topic>"``, ``subject`` the topic,
    ``data`` the payload bytes.

    Raises:
        MalformedEvent: the message claims to be a CloudEvent and is not a valid one.
        UnsupportedVersion: an unknown ``specversion``.
    """
    if is_structured(msg):
        try:
            text = msg.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEvent(f"structured CloudEvent is not UTF-8: {exc}") from exc
        ev = from_cloudevent(text)
    else:
        a = _plain_attrs(msg, kind)
        if "specversion" not in a:
            return Event(type=f"{kind}.message", source=f"{kind}:{msg.topic}", subject=msg.topic,
                         data=msg.payload, datacontenttype=msg.content_type or None,
                         extras={ORIGIN_ATTR: origin})
        ce: dict[str, Any] = {}
        for k, v in a.items():
            if k in ("meshseq",):
                try:
                    ce[k] = json.loads(v)
                except ValueError as exc:
                    raise MalformedEvent(f"{k}: not a number: {v!r}", field=k) from exc
            elif k != DATAENC_ATTR:
                ce[k] = v
        # MQTT: the Content Type property (a `datacontenttype` user property, as the binding's
        # example also shows, when the property is absent). NATS: `ce-datacontenttype`; the
        # `content-type` header when it is absent (earlier zeromesh bridges sent it there).
        if msg.content_type is not None and (kind == "mqtt" or "datacontenttype" not in ce):
            ce["datacontenttype"] = msg.content_type
        enc = a.get(DATAENC_ATTR)
        data: Any
        if enc is None:
            data = msg.payload
        elif enc == "none":
            data = None
        elif enc == "json":
            try:
                data = json.loads(msg.payload)
            except ValueError as exc:
                raise MalformedEvent(f"data: invalid JSON: {exc}", field="data") from exc
        elif enc == "msgpack":
            try:
                data = msgpack.unpackb(msg.payload, raw=False)
            except Exception as exc:
                raise MalformedEvent(f"data: invalid msgpack: {exc}", field="data") from exc
        else:
            raise MalformedEvent(f"{DATAENC_ATTR}: unknown encoding {enc!r}",
                                 field=DATAENC_ATTR)
        ce["data_base64"] = base64.b64encode(msg.payload).decode()
        ev = from_cloudevent(ce).replace(data=data)
    extras = dict(ev.extras)
    extras[ORIGIN_ATTR] = origin
    return ev.replace(extras=extras, stream="", seq=None)


def safe_message_to_event(msg: Message, *, kind: Kind, origin: str) -> Event:
    """:func:`message_to_event` with every decoding failure as a :class:`CodecError`."""
    try:
        return message_to_event(msg, kind=kind, origin=origin)
    except CodecError:
        raise
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise MalformedEvent(f"undecodable message: {exc}") from exc


# --- loops ---------------------------------------------------------------------------------------


class LoopGuard:
    """Recognises events this bridge already carried across, by origin and by id.

    Outbound: an event whose ``bridgeorigin`` is ours came in through us: do not send it back.
    Inbound: a message whose origin attribute is ours, or whose id we sent out recently (the
    origin attribute may be stripped by a relay), is our own event coming back.
    """

    def __init__(self, origin: str, *, remember: int = 100_000) -> None:
        self.origin = origin
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._max = remember

    def sent(self, ids: Iterable[str]) -> None:
        """Remember ids sent out (bounded; oldest forgotten first)."""
        d = self._ids
        for i in ids:
            d[i] = None
            d.move_to_end(i)
        while len(d) > self._max:
            d.popitem(last=False)

    def outbound_is_loop(self, ev: Event) -> bool:
        """True when ``ev`` entered the mesh through this bridge."""
        return ev.extras.get(ORIGIN_ATTR) == self.origin

    def inbound_is_loop(self, event_id: str | None, origin: str | None) -> bool:
        """True when a message with this id / origin attribute left the mesh through us."""
        return origin == self.origin or (event_id is not None and event_id in self._ids)


def b64(data: bytes) -> str:
    """Base64 text (for DLQ display)."""
    return base64.b64encode(data).decode()
