"""The zeromesh mDNS TXT record: pure encode / decode / validation, no I/O.

A node announces itself with a DNS-SD service whose TXT record carries a compact
:class:`mesh.peers.PeerInfo`. The layout (specified in docs/protocol.md)::

    v=1                     protocol major version (required, first)
    mesh=<mesh name>        required
    id=<32 lowercase hex>   node id (required)
    name=<node name>        required
    host=<host id>          optional; peers with the same host prefer ipc endpoints
    pk=<40 char Z85>        CURVE public key, only when security is on
    ep.<role>=<e1>,<e2>     endpoints per role; "control" first, then other roles by name
    o.stream=<n1>,<n2>      offers per kind (stream, queue, service)
    o.queue=...
    o.service=...
    more=1                  present when something did not fit: fetch the full PeerInfo
                            over the control channel (HELLO)

Every string is ``key=value`` in UTF-8, at most 255 bytes (the DNS length prefix is one
byte). The whole record is kept under :data:`MAX_TXT_BYTES` so that the announcement (PTR, SRV,
TXT and address records) fits one packet on a 1500-byte MTU. Unknown keys, unknown offer
kinds and endpoints of unknown schemes are skipped (forward compatibility); anything else
that is wrong rejects the whole record with :class:`mesh.errors.TxtRecordError`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
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
_ROLE_RE = re.compile(r"[a-z0-9_-]{1,32}")
_Z85_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_SCHEME_RE = re.compile(r"([a-z][a-z0-9+.-]{0,15})://(.+)", re.DOTALL)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_KNOWN_SCHEMES = ("tcp", "ipc")


@dataclass(frozen=True)
class TxtRecord:
    """A decoded announcement.

    Attributes:
        info: the peer as far as the record describes it.
        truncated: the sender set ``more=1``: offers or endpoints were left out; the full
            PeerInfo comes with the peer's HELLO on the control channel.
    """

    info: PeerInfo
    truncated: bool = False


@dataclass(frozen=True)
class EncodedTxt:
    """An encoded TXT record, ready for ``zeroconf.ServiceInfo(properties=...)``.

    Attributes:
        properties: ``key -> value`` in the order they must be sent.
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

    Required keys always go in. Then endpoints (role ``control`` first) and offers (in
    OFFER_KINDS order) are added one item at a time while they fit; an item that does not fit,
    or cannot be carried in a comma list (a name with a comma), is left out and ``more=1``
    tells peers to take the full PeerInfo from HELLO.

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

    roles = sorted(info.endpoints, key=lambda r: (r != "control", r))
    for role in roles:
        if not _ROLE_RE.fullmatch(role):
            truncated = True
            continue
        items = []
        for ep in info.endpoints[role]:
            try:
                validate_endpoint(ep, field=f"ep.{role}")
            except TxtRecordError:
                truncated = True  # e.g. a wildcard bind: not announceable, HELLO has the rest
                continue
            items.append(ep)
        add_list(f"ep.{role}", items)
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


def _as_text(obj: object, field: str | None) -> str:
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TxtRecordError("not valid UTF-8", field=field) from exc
    if isinstance(obj, str):
        return obj
    raise TxtRecordError(f"wrong type {type(obj).__name__}", field=field)


def _normalise(properties: object) -> dict[str, str | None]:
    if not isinstance(properties, Mapping):
        raise TxtRecordError(f"properties must be a mapping, not {type(properties).__name__}")
    out: dict[str, str | None] = {}
    total = 0
    for raw_key, raw_value in properties.items():
        key = _as_text(raw_key, None)
        if not key or "=" in key or not key.isprintable():
            raise TxtRecordError(f"bad key {key!r}")
        value = None if raw_value is None else _as_text(raw_value, key)
        entry = len(key.encode()) + (0 if value is None else 1 + len(value.encode()))
        if entry > MAX_TXT_STRING:
            raise TxtRecordTooLarge(entry, MAX_TXT_STRING, field=key)
        total += 1 + entry
        if key in out:
            raise TxtRecordError("duplicate key", field=key)
        out[key] = value
    if total > MAX_TXT_BYTES:
        raise TxtRecordTooLarge(total, MAX_TXT_BYTES)
    return out


def _required(props: Mapping[str, str | None], key: str) -> str:
    value = props.get(key)
    if value is None:
        raise TxtRecordError("missing" if key not in props else "has no value", field=key)
    return value


def _split(value: str | None, field: str) -> list[str]:
    if value is None:
        raise TxtRecordError("has no value", field=field)
    if not value:
        return []
    return value.split(",")


def decode_txt(properties: object) -> TxtRecord:
    """Decode and validate the TXT properties of a resolved service.

    Args:
        properties: the mapping zeroconf gives (``ServiceInfo.properties``: bytes keys and
            bytes-or-None values); str is accepted too. Anything else is rejected.

    Returns:
        The announced peer; ``truncated`` when the record says ``more=1``.

    Raises:
        TxtRecordError: missing or mistyped key, not UTF-8, wrong protocol version, bad id,
            bad endpoint, bad offer name, duplicate key.
        TxtRecordTooLarge: a string over 255 bytes or a record over MAX_TXT_BYTES.
    """
    props = _normalise(properties)
    v = _required(props, "v")
    if not _VERSION_RE.fullmatch(v) or int(v) != PROTOCOL_VERSION:
        raise TxtRecordError(f"unsupported protocol version {v!r}; this build speaks "
                             f"{PROTOCOL_VERSION}", field="v")
    mesh = _required(props, "mesh")
    node_id = _required(props, "id")
    name = _required(props, "name")
    host = props.get("host") or ""
    pk = props.get("pk")
    if "pk" in props and pk is None:
        raise TxtRecordError("has no value", field="pk")
    _check_common(mesh, node_id, name, host, pk)
    more = props.get("more", "0")
    if more not in ("0", "1"):
        raise TxtRecordError(f"must be 0 or 1, not {more!r}", field="more")

    endpoints: dict[str, tuple[str, ...]] = {}
    offers: dict[str, tuple[str, ...]] = {}
    for key, value in props.items():
        if key.startswith("ep."):
            role = key[3:]
            if not _ROLE_RE.fullmatch(role):
                raise TxtRecordError("bad role name", field=key)
            eps = [ep for ep in _split(value, key) if validate_endpoint(ep, field=key)]
            if eps:
                endpoints[role] = tuple(dict.fromkeys(eps))
        elif key.startswith("o."):
            kind = key[2:]
            names = _split(value, key)
            for n in names:
                if not _offer_ok(n):
                    raise TxtRecordError(f"bad offer name {n!r}", field=key)
            if kind in OFFER_KINDS and names:
                offers[kind] = tuple(dict.fromkeys(names))
        # Any other key is from a later minor revision: ignored on purpose.
    info = PeerInfo(
        node_id=node_id,
        name=name,
        mesh=mesh,
        version=int(v),
        host=host,
        endpoints=endpoints,
        offers=offers,
        public_key=pk,
    )
    return TxtRecord(info=info, truncated=more == "1")
