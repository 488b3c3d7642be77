"""The zeromesh mDNS TXT record: pure encode / decode / validation, no I/O.

A node announces itself with a DNS-SD service whose TXT record carries a compact
:class:`mesh.peers.PeerInfo`. The layout (specified, with its grammar, in docs/protocol.md,
"Discovery: the zeromesh mDNS announcement")::

    v=1                     protocol major version (required, first)
    mesh=<mesh name>        required
    id=<32 lowercase hex>   node id (required; must equal the instance name's label)
    name=<node name>        required
    host=<host id>          optional; peers with the same host prefer ipc endpoints
    pk=<40 char Z85>        CURVE public key, only when security is on
    inc=<decimal>           the node's incarnation (grows with every start); optional
    ep.<role>=<e1>,<e2>     endpoints per role; "control" first, then other roles by name.
                            Roles may contain dots: ep.pipe.jobs, ep.rpc.echo, ep.pubsub
    o.stream=<n1>,<n2>      offers per kind (stream, queue, service)
    o.queue=...
    o.service=...
    more=1                  present when something did not fit: fetch the full PeerInfo
                            over the control channel (HELLO)

Key rules follow RFC 6763 section 6: a TXT string is ``key=value`` (or a bare ``key``, a
boolean attribute that is present with no value), at most 255 bytes (the DNS length prefix is
one byte); a key is 1 or more printable US-ASCII characters other than ``=``; keys are compared
case-insensitively; when a key repeats, the first occurrence wins and the others are ignored;
a string that starts with ``=`` (no key) or is empty is ignored. The whole record is kept
under :data:`MAX_TXT_BYTES` so that the announcement (PTR, SRV, TXT and address records) fits
one packet on a 1500-byte MTU.

What a decoder does with what it cannot use: an unknown key, an unknown offer kind or an
endpoint of an unknown scheme is skipped silently (forward compatibility); a malformed
optional piece (a bad role name in an ``ep.`` key, a bad endpoint or offer name, a bad
``host``, a repeated key, a key that is not printable US-ASCII) is skipped on its own and
noted in :attr:`TxtRecord.skipped`. Only these reject the whole record with
:class:`mesh.errors.TxtRecordError`: broken framing, a record over :data:`MAX_TXT_BYTES`, a
mandatory key (``v``, ``mesh``, ``id``, ``name``) missing, without a value or invalid, an
unsupported version, and a ``pk`` that is present but not a valid key.

Repeated keys can only be seen in the raw TXT rdata (python-zeroconf's
``ServiceInfo.properties`` is a dict of case-sensitive keys), so :func:`decode_txt` takes the
raw bytes (``ServiceInfo.text``); a mapping is accepted too (tests, callers without rdata),
and is read with the same rules in its iteration order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mesh.errors import TxtRecordError, TxtRecordTooLarge
from mesh.peers import OFFER_KINDS, PROTOCOL_VERSION, PeerInfo

__all__ = [
    "DEFAULT_TXT_BUDGET",
    "MAX_TXT_BYTES",
    "MAX_TXT_STRING",
    "EncodedTxt",
    "TxtRecord",
    "decode_txt",
    "encode_txt",
    "pack_txt",
    "split_txt",
    "txt_size",
    "validate_endpoint",
]

#: Largest single TXT string (``key=value``): its length prefix is one byte.
MAX_TXT_STRING = 255
#: Largest TXT record (sum of length-prefixed strings) a peer accepts.
MAX_TXT_BYTES = 1300
#: What an encoder aims for by default: leaves ~300 bytes of the packet for PTR/SRV/A records.
DEFAULT_TXT_BUDGET = 1000

_MAX_MESH = 64
_MAX_NAME = 128
_MAX_HOST = 64
_MAX_ITEM = 200  # one endpoint or one offer name

_ID_RE = re.compile(r"[0-9a-f]{32}")
_VERSION_RE = re.compile(r"[0-9]{1,4}")
# A role: a kind token, then optionally "." and a name of printable US-ASCII other than "="
# (the characters RFC 6763 allows in a key). "control", "pubsub", "pipe.jobs", "rpc.echo".
# On the wire the kind is case-insensitive (keys are); a receiver lowercases it and keeps the
# name as sent. An encoder only writes roles whose kind is already lowercase.
_ROLE_WIRE_RE = re.compile(r"([A-Za-z0-9_-]{1,32})(\.[\x20-\x3c\x3e-\x7e]+)?")
_ROLE_SEND_RE = re.compile(r"[a-z0-9_-]{1,32}(\.[\x20-\x3c\x3e-\x7e]+)?")
_Z85_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_SCHEME_RE = re.compile(r"([a-z][a-z0-9+.-]{0,15})://(.+)", re.DOTALL)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_KNOWN_SCHEMES = ("tcp", "ipc")


@dataclass(frozen=True)
class TxtRecord:
    """A decoded announcement.

    Attributes:
        info: the peer as far as the record describes it.
        truncated: the sender set ``more`` (to anything but ``0``): offers or endpoints were
            left out; the full PeerInfo comes with the peer's HELLO on the control channel.
        skipped: one note per malformed or repeated piece that was skipped (the rest of the
            record was used). Unknown keys, kinds and schemes are not noted: they are normal.
    """

    info: PeerInfo
    truncated: bool = False
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncodedTxt:
    """An encoded TXT record, ready for ``zeroconf.ServiceInfo(properties=...)``.

    Attributes:
        properties: ``key -> value`` in the order they must be sent (no two keys equal
            ignoring case).
        truncated: something did not fit and ``more=1`` was set.
        size: the wire size of the TXT rdata in bytes.
    """

    properties: dict[str, str]
    truncated: bool
    size: int


def txt_size(properties: Mapping[str, str]) -> int:
    """Wire size of a TXT rdata: one length byte plus ``key=value`` per string."""
    return sum(1 + _entry_len(k, v) for k, v in properties.items())


def _entry_len(key: str, value: str) -> int:
    return len(key.encode()) + 1 + len(value.encode())


def pack_txt(strings: Iterable[bytes | str | tuple[str | bytes, str | bytes | None]]) -> bytes:
    """Build raw TXT rdata from strings (``b"k=v"``) or ``(key, value)`` pairs (value None: a
    bare boolean key). For tests and tools; nothing is validated except the 255-byte limit.

    Raises:
        TxtRecordTooLarge: a string over 255 bytes.
    """
    out = bytearray()
    for item in strings:
        if isinstance(item, tuple):
            key, value = item
            raw = key.encode() if isinstance(key, str) else key
            if value is not None:
                raw += b"=" + (value.encode() if isinstance(value, str) else value)
        else:
            raw = item.encode() if isinstance(item, str) else item
        if len(raw) > MAX_TXT_STRING:
            raise TxtRecordTooLarge(len(raw), MAX_TXT_STRING)
        out.append(len(raw))
        out += raw
    return bytes(out)


def split_txt(rdata: bytes) -> list[bytes]:
    """Split raw TXT rdata (RFC 1035: length-prefixed strings) into its strings.

    Raises:
        TxtRecordTooLarge: the rdata is over :data:`MAX_TXT_BYTES`.
        TxtRecordError: a length byte runs past the end (broken framing).
    """
    if len(rdata) > MAX_TXT_BYTES:
        raise TxtRecordTooLarge(len(rdata), MAX_TXT_BYTES)
    out: list[bytes] = []
    pos, end = 0, len(rdata)
    while pos < end:
        n = rdata[pos]
        if pos + 1 + n > end:
            raise TxtRecordError(f"a string of {n} bytes runs past the end of the record")
        out.append(bytes(rdata[pos + 1:pos + 1 + n]))
        pos += 1 + n
    return out


# --- validation (shared by encoder and decoder) ----------------------------------------------


def _check_text(field: str, value: str, max_bytes: int, *, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise TxtRecordError("empty value", field=field)
    if len(value.encode()) > max_bytes:
        raise TxtRecordError(f"longer than {max_bytes} bytes", field=field)
    if not value.isprintable():
        raise TxtRecordError("contains control characters", field=field)
    return value


def validate_endpoint(endpoint: str, *, field: str = "endpoint") -> bool:
    """Check one announced endpoint.

    Returns:
        True for a valid ``tcp://`` or ``ipc://`` endpoint; False for a well-formed endpoint of
        another scheme (a later protocol may add schemes; callers skip it).

    Raises:
        TxtRecordError: malformed, a wildcard address (not connectable), a bad port, a comma.
    """
    if not endpoint or len(endpoint.encode()) > _MAX_ITEM or "," in endpoint:
        raise TxtRecordError(f"bad endpoint {endpoint!r}", field=field)
    if not endpoint.isprintable() or any(c.isspace() for c in endpoint):
        raise TxtRecordError(f"bad characters in endpoint {endpoint!r}", field=field)
    m = _SCHEME_RE.fullmatch(endpoint)
    if m is None:
        raise TxtRecordError(f"endpoint {endpoint!r} is not scheme://address", field=field)
    scheme, rest = m.group(1), m.group(2)
    if scheme not in _KNOWN_SCHEMES:
        return False
    if scheme == "ipc":
        # Linux sun_path is 108 bytes including the NUL; "@name" is the abstract namespace.
        if len(rest.encode()) > 107 or not (rest.startswith("/") or rest.startswith("@")):
            raise TxtRecordError(f"bad ipc path in {endpoint!r}", field=field)
        return True
    host, sep, port_s = rest.rpartition(":")
    if not sep or not port_s.isdigit() or not port_s.isascii() or not 0 < int(port_s) < 65536:
        raise TxtRecordError(f"bad port in {endpoint!r}", field=field)
    if host.startswith("[") and host.endswith("]"):
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise TxtRecordError(f"bad IPv6 address in {endpoint!r}", field=field) from exc
    else:
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
                raise TxtRecordError(f"bad host in {endpoint!r}", field=field) from None
            return True
    if addr.is_unspecified or addr.is_multicast:
        raise TxtRecordError(f"endpoint {endpoint!r} is not connectable", field=field)
    return True


def _check_common(mesh: str, node_id: str, name: str, host: str, pk: str | None) -> None:
    _check_text("mesh", mesh, _MAX_MESH)
    if not _ID_RE.fullmatch(node_id):
        raise TxtRecordError("node id must be 32 lowercase hex characters", field="id")
    _check_text("name", name, _MAX_NAME)
    _check_text("host", host, _MAX_HOST, allow_empty=True)
    if pk is not None and not _Z85_RE.fullmatch(pk):
        raise TxtRecordError("public key must be 40 Z85 characters", field="pk")


def _offer_ok(name: str) -> bool:
    return bool(name) and "," not in name and name.isprintable() and len(name.encode()) <= _MAX_ITEM


# --- encoder ---------------------------------------------------------------------------------


def encode_txt(info: PeerInfo, *, budget: int = DEFAULT_TXT_BUDGET) -> EncodedTxt:
    """Encode a node's PeerInfo as TXT properties within ``budget`` bytes.

    Required keys always go in. Then endpoints (role ``control`` first, then roles by name)
    and offers (in OFFER_KINDS order) are added one item at a time while they fit; an item
    that does not fit, or cannot be written (a name with a comma; a role that is not a key:
    non-ASCII, ``=``, an upper-case kind, or equal ignoring case to a role already written),
    is left out and ``more=1`` tells peers to take the full PeerInfo from HELLO.

    Raises:
        TxtRecordError: a required field is invalid (bad id, empty mesh name, ...), or the
            budget is outside [64, MAX_TXT_BYTES].
        TxtRecordTooLarge: the required keys alone exceed the budget or a string's 255 bytes.
    """
    if not 64 <= budget <= MAX_TXT_BYTES:
        raise TxtRecordError(f"budget {budget} outside [64, {MAX_TXT_BYTES}]")
    _check_common(info.mesh, info.node_id, info.name, info.host, info.public_key)
    props: dict[str, str] = {
        "v": str(int(info.version)),
        "mesh": info.mesh,
        "id": info.node_id,
        "name": info.name,
    }
    if info.host:
        props["host"] = info.host
    if info.public_key is not None:
        props["pk"] = info.public_key
    if info.incarnation:
        props["inc"] = str(int(info.incarnation))
    for key, value in props.items():
        if _entry_len(key, value) > MAX_TXT_STRING:
            raise TxtRecordTooLarge(_entry_len(key, value), MAX_TXT_STRING, field=key)
    # Reserve room for "more=1" so that truncation can always be flagged.
    limit = budget - (1 + len("more=1"))
    size = txt_size(props)
    if size > limit:
        raise TxtRecordTooLarge(size, limit)
    truncated = False

    def add_list(key: str, items: list[str]) -> None:
        nonlocal size, truncated
        kept: list[str] = []
        for item in items:
            value = ",".join([*kept, item])
            entry = 1 + _entry_len(key, value)
            old = 1 + _entry_len(key, ",".join(kept)) if kept else 0
            if entry - 1 > MAX_TXT_STRING or size - old + entry > limit:
                truncated = True
                continue
            kept.append(item)
            size += entry - old
        if kept:
            props[key] = ",".join(kept)

    written: set[str] = set()  # role keys, lowercased: TXT keys compare case-insensitively
    roles = sorted(info.endpoints, key=lambda r: (r != "control", r))
    for role in roles:
        key = f"ep.{role}"
        if not _ROLE_SEND_RE.fullmatch(role) or key.lower() in written:
            truncated = True
            continue
        written.add(key.lower())
        items = []
        for ep in info.endpoints[role]:
            try:
                validate_endpoint(ep, field=key)
            except TxtRecordError:
                truncated = True  # e.g. a wildcard bind: not announceable, HELLO has the rest
                continue
            items.append(ep)
        add_list(key, items)
    if info.endpoints.get("control") and "ep.control" not in props:
        raise TxtRecordTooLarge(size + 1 + _entry_len("ep.control", info.endpoints["control"][0]),
                                limit, field="ep.control")
    for kind in OFFER_KINDS:
        names = list(dict.fromkeys(info.offers.get(kind, ())))
        good = [n for n in names if _offer_ok(n)]
        if len(good) != len(names):
            truncated = True
        add_list(f"o.{kind}", good)
    for kind in info.offers:
        if kind not in OFFER_KINDS and info.offers[kind]:
            truncated = True
    if truncated:
        props["more"] = "1"
        size += 1 + len("more=1")
    return EncodedTxt(properties=props, truncated=truncated, size=size)


# --- decoder ---------------------------------------------------------------------------------


def _raw(obj: object) -> bytes | None:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, str):
        try:
            return obj.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return None
    return None


def _strings(record: object, notes: list[str]) -> list[bytes]:
    """The record's TXT strings, in wire order, from raw rdata or a mapping."""
    if isinstance(record, (bytes, bytearray, memoryview)):
        return split_txt(bytes(record))
    if not isinstance(record, Mapping):
        raise TxtRecordError(
            f"a TXT record must be raw rdata (bytes) or a mapping, not {type(record).__name__}")
    out: list[bytes] = []
    total = 0
    for raw_key, raw_value in record.items():
        key = _raw(raw_key)
        value = None if raw_value is None else _raw(raw_value)
        if key is None or (raw_value is not None and value is None):
            notes.append(f"{raw_key!r}: skipped: key or value of type "
                         f"{type(raw_key).__name__}/{type(raw_value).__name__}")
            continue
        s = key if raw_value is None else key + b"=" + (value or b"")
        total += 1 + len(s)
        out.append(s)
    if total > MAX_TXT_BYTES:
        raise TxtRecordTooLarge(total, MAX_TXT_BYTES)
    return out


def _items(record: object) -> tuple[dict[str, tuple[str, bytes | None]], list[str]]:
    """RFC 6763 section 6: ``lowercased key -> (key as sent, value or None)``, first
    occurrence of each key only; plus notes of what was skipped."""
    notes: list[str] = []
    items: dict[str, tuple[str, bytes | None]] = {}
    for s in _strings(record, notes):
        if not s or s.startswith(b"="):
            continue  # RFC 6763 6.4: an empty string, or one with no key, is ignored
        if len(s) > MAX_TXT_STRING:
            notes.append(f"{s[:20]!r}...: skipped: a string over {MAX_TXT_STRING} bytes")
            continue
        key_b, sep, value = s.partition(b"=")
        if not all(0x20 <= c <= 0x7E for c in key_b):
            notes.append(f"{key_b[:40]!r}: skipped: a key must be printable US-ASCII")
            continue
        key = key_b.decode("ascii")
        low = key.lower()
        if low in items:
            notes.append(f"{key!r}: skipped: repeats an earlier key (the first one wins)")
            continue
        items[low] = (key, value if sep else None)
    return items, notes


def _text(value: bytes, field: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TxtRecordError("not valid UTF-8", field=field) from exc


def _required(items: Mapping[str, tuple[str, bytes | None]], key: str) -> str:
    if key not in items:
        raise TxtRecordError("missing", field=key)
    value = items[key][1]
    if value is None:
        raise TxtRecordError("has no value", field=key)
    return _text(value, key)


def _role(key_role: str) -> str | None:
    m = _ROLE_WIRE_RE.fullmatch(key_role)
    if m is None:
        return None
    return m.group(1).lower() + (m.group(2) or "")


def decode_txt(record: object) -> TxtRecord:
    """Decode and validate a resolved service's TXT record (RFC 6763 key rules).

    Args:
        record: the raw TXT rdata (``ServiceInfo.text``: what lets the first of a repeated
            key win), or a mapping of keys to values (bytes or str; None for a bare key),
            read in its iteration order. Anything else is rejected.

    Returns:
        The announced peer; ``truncated`` when the record says ``more``; ``skipped`` notes
        the malformed or repeated pieces left out.

    Raises:
        TxtRecordError: broken framing; a mandatory key (v, mesh, id, name) missing, without
            a value, not UTF-8 or invalid; an unsupported protocol version; ``pk`` present
            but not 40 Z85 characters.
        TxtRecordTooLarge: a record over MAX_TXT_BYTES.
    """
    items, notes = _items(record)
    v = _required(items, "v")
    if not _VERSION_RE.fullmatch(v) or int(v) != PROTOCOL_VERSION:
        raise TxtRecordError(f"unsupported protocol version {v!r}; this build speaks "
                             f"{PROTOCOL_VERSION}", field="v")
    mesh = _check_text("mesh", _required(items, "mesh"), _MAX_MESH)
    node_id = _required(items, "id")
    if not _ID_RE.fullmatch(node_id):
        raise TxtRecordError("node id must be 32 lowercase hex characters", field="id")
    name = _check_text("name", _required(items, "name"), _MAX_NAME)
    pk: str | None = None
    if "pk" in items:  # the peer's CURVE identity: one we cannot read rejects the record
        pk = _required(items, "pk")
        if not _Z85_RE.fullmatch(pk):
            raise TxtRecordError("public key must be 40 Z85 characters", field="pk")
    host = ""
    if "host" in items:
        raw_host = items["host"][1]
        try:
            if raw_host is None:
                raise TxtRecordError("has no value", field="host")
            host = _check_text("host", _text(raw_host, "host"), _MAX_HOST, allow_empty=True)
        except TxtRecordError as exc:
            notes.append(f"'host': skipped: {exc.reason}")
    inc = 0
    if "inc" in items:  # informational (the HELLO that answers a dial carries it too)
        raw_inc = items["inc"][1]
        if raw_inc is not None and raw_inc.isdigit() and len(raw_inc) <= 19 \
                and int(raw_inc) < 1 << 63:
            inc = int(raw_inc)
        else:
            notes.append("'inc': skipped: not a decimal number below 2**63")
    more = "more" in items and items["more"][1] != b"0"  # a bare "more" is present: true

    endpoints: dict[str, tuple[str, ...]] = {}
    offers: dict[str, tuple[str, ...]] = {}
    for low, (key, raw) in items.items():
        if low.startswith("ep."):
            role = _role(key[3:])
            if role is None:
                notes.append(f"{key!r}: skipped: not a role name")
                continue
            eps = _list(key, raw, notes, _endpoint_ok)
            if eps:
                endpoints[role] = tuple(dict.fromkeys(eps))
        elif low.startswith("o.") and low[2:] in OFFER_KINDS:
            names = _list(key, raw, notes, _offer_name_ok)
            if names:
                offers[low[2:]] = tuple(dict.fromkeys(names))
        # Any other key (an unknown o.<kind> too) is from a later revision: skipped on purpose.
    info = PeerInfo(
        node_id=node_id,
        name=name,
        mesh=mesh,
        version=int(v),
        host=host,
        endpoints=endpoints,
        offers=offers,
        public_key=pk,
        incarnation=inc,
    )
    return TxtRecord(info=info, truncated=more, skipped=tuple(notes))


def _list(key: str, raw: bytes | None, notes: list[str],
          check: Callable[[str, str], str | None]) -> list[str]:
    """The comma-separated items of an ``ep.`` or ``o.`` value that pass ``check`` (which
    returns None to skip silently, or raises TxtRecordError to skip with a note)."""
    if raw is None:
        notes.append(f"{key!r}: skipped: has no value")
        return []
    try:
        value = _text(raw, key)
    except TxtRecordError as exc:
        notes.append(f"{key!r}: skipped: {exc.reason}")
        return []
    out: list[str] = []
    for item in value.split(",") if value else ():
        try:
            got = check(item, key)
        except TxtRecordError as exc:
            notes.append(f"{key!r}: item skipped: {exc.reason}")
            continue
        if got is not None:
            out.append(got)
    return out


def _endpoint_ok(ep: str, key: str) -> str | None:
    return ep if validate_endpoint(ep, field=key) else None  # False: an unknown scheme


def _offer_name_ok(name: str, key: str) -> str | None:
    if not _offer_ok(name):
        raise TxtRecordError(f"bad offer name {name!r}", field=key)
    return name
