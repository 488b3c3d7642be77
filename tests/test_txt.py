"""Unit tests of the mDNS TXT record codec (mesh.txt): pure, no I/O."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ProtocolError, TxtRecordError, TxtRecordTooLarge
from mesh.peers import PeerInfo
from mesh.txt import (
    DEFAULT_TXT_BUDGET,
    MAX_TXT_BYTES,
    decode_txt,
    encode_txt,
    pack_txt,
    split_txt,
    txt_size,
    validate_endpoint,
)

PK = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def make_info(**kw: object) -> PeerInfo:
    base: dict[str, object] = dict(
        node_id=uuid.uuid4().hex,
        name="node-a",
        mesh="m1",
        host="host-1",
        endpoints={"control": ("tcp://127.0.0.1:5000", "ipc:///tmp/zm/a.control")},
        offers={"stream": ("temps",), "queue": ("jobs",), "service": ("echo",)},
        public_key=PK,
    )
    base.update(kw)
    return PeerInfo(**base)  # type: ignore[arg-type]


def wire(props: dict[str, str]) -> dict[bytes, bytes]:
    """What zeroconf hands a browser: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in props.items()}


def test_roundtrip_full_info() -> None:
    info = make_info()
    enc = encode_txt(info)
    assert not enc.truncated
    assert list(enc.properties)[:4] == ["v", "mesh", "id", "name"]
    assert enc.size == txt_size(enc.properties) <= DEFAULT_TXT_BUDGET
    rec = decode_txt(wire(enc.properties))
    assert rec.info == info
    assert not rec.truncated


def test_roundtrip_without_key_and_host() -> None:
    info = make_info(public_key=None, host="", offers={})
    rec = decode_txt(wire(encode_txt(info).properties))
    assert rec.info == info
    assert "pk" not in encode_txt(info).properties


def test_many_offers_are_truncated_with_more_flag() -> None:
    streams = tuple(f"stream-number-{i:04d}" for i in range(200))
    info = make_info(offers={"stream": streams, "service": ("echo",)})
    enc = encode_txt(info)
    assert enc.truncated and enc.properties["more"] == "1"
    assert enc.size <= DEFAULT_TXT_BUDGET
    assert all(1 + len(k) + 1 + len(v.encode()) <= 256 for k, v in enc.properties.items())
    rec = decode_txt(wire(enc.properties))
    assert rec.truncated
    got = rec.info.offers["stream"]
    assert 0 < len(got) < len(streams) and got == streams[: len(got)]
    assert rec.info.endpoints == info.endpoints  # endpoints come before offers


def test_wildcard_endpoint_is_left_out_and_flagged() -> None:
    info = make_info(endpoints={"control": ("tcp://0.0.0.0:5000", "tcp://127.0.0.1:5000")})
    enc = encode_txt(info)
    assert enc.truncated
    assert enc.properties["ep.control"] == "tcp://127.0.0.1:5000"


def test_required_part_too_large_raises() -> None:
    with pytest.raises(TxtRecordTooLarge) as ei:
        encode_txt(make_info(name="n" * 100), budget=120)
    assert ei.value.max_size < 120


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": "2"}, "v"),
        ({"v": "one"}, "v"),
        ({"v": " 1"}, "v"),
        ({"id": "xyz"}, "id"),
        ({"id": "A" * 32}, "id"),
        ({"mesh": ""}, "mesh"),
        ({"name": "bad\nname"}, "name"),
        ({"name": ""}, "name"),
        ({"pk": "short"}, "pk"),
    ],
)
def test_bad_mandatory_field_rejects_the_record(change: dict[str, str], field: str) -> None:
    props = dict(encode_txt(make_info()).properties)
    props.update(change)
    with pytest.raises(TxtRecordError) as ei:
        decode_txt(wire(props))
    assert ei.value.field == field
    assert isinstance(ei.value, ProtocolError)


@pytest.mark.parametrize(
    ("change", "role"),
    [
        ({"ep.control": "tcp://127.0.0.1"}, "control"),
        ({"ep.control": "tcp://127.0.0.1:0"}, "control"),
        ({"ep.control": "tcp://127.0.0.1:99999"}, "control"),
        ({"ep.control": "tcp://*:5000"}, "control"),
        ({"ep.control": "tcp://0.0.0.0:5000"}, "control"),
        ({"ep.control": "garbage"}, "control"),
        ({"ep.control": "ipc://relative/path"}, "control"),
        ({"ep.control": "tcp://[::zz]:1"}, "control"),
    ],
)
def test_bad_endpoint_is_skipped_alone(change: dict[str, str], role: str) -> None:
    """Old code dropped the whole record for one bad endpoint."""
    props = dict(encode_txt(make_info()).properties)
    props["ep.pipe.jobs"] = "tcp://127.0.0.1:7000"
    props.update(change)
    rec = decode_txt(wire(props))
    assert role not in rec.info.endpoints  # the only endpoint of the key was bad
    assert rec.info.endpoints["pipe.jobs"] == ("tcp://127.0.0.1:7000",)
    assert rec.info.name == "node-a" and len(rec.skipped) == 1
    assert "ep.control" in rec.skipped[0]


def test_bad_items_are_skipped_one_by_one() -> None:
    props = dict(encode_txt(make_info()).properties)
    props["ep.control"] = "garbage,tcp://127.0.0.1:5000,tcp://*:1"
    props["o.stream"] = "a,,b"
    props["host"] = "bad\x01host"
    rec = decode_txt(wire(props))
    assert rec.info.endpoints["control"] == ("tcp://127.0.0.1:5000",)
    assert rec.info.offers["stream"] == ("a", "b")
    assert rec.info.host == ""
    assert len(rec.skipped) == 4  # two endpoints, one empty name, the host


@pytest.mark.parametrize("key", ["v", "mesh", "id", "name"])
def test_missing_required_key_is_rejected(key: str) -> None:
    props = dict(encode_txt(make_info()).properties)
    del props[key]
    with pytest.raises(TxtRecordError, match="missing") as ei:
        decode_txt(wire(props))
    assert ei.value.field == key


def test_key_without_value_is_rejected() -> None:
    props: dict[bytes, bytes | None] = dict(wire(encode_txt(make_info()).properties))
    props[b"name"] = None
    with pytest.raises(TxtRecordError, match="no value"):
        decode_txt(props)


def test_non_utf8_and_wrong_types() -> None:
    props: dict[object, object] = dict(wire(encode_txt(make_info()).properties))
    bad = dict(props)
    bad[b"name"] = b"\xff\xfe"
    with pytest.raises(TxtRecordError, match="UTF-8"):
        decode_txt(bad)
    bad = dict(props)
    bad[b"name"] = 42  # a mapping entry that is no TXT string is skipped: name is missing
    with pytest.raises(TxtRecordError, match="missing") as ei:
        decode_txt(bad)
    assert ei.value.field == "name"
    bad = dict(props)
    bad[b"host"] = b"\xff"  # optional: skipped alone
    bad[7] = b"x"
    rec = decode_txt(bad)
    assert rec.info.host == "" and len(rec.skipped) == 2
    with pytest.raises(TxtRecordError, match="raw rdata"):
        decode_txt([("v", "1")])


def test_oversize_record_is_rejected_and_oversize_string_skipped() -> None:
    props = dict(wire(encode_txt(make_info()).properties))
    props[b"x"] = b"y" * 300  # cannot be on the wire (255 bytes): skipped
    rec = decode_txt(props)
    assert any("255" in n for n in rec.skipped)
    props = dict(wire(encode_txt(make_info()).properties))
    for i in range(10):
        props[f"pad{i}".encode()] = b"z" * 200
    with pytest.raises(TxtRecordTooLarge) as ei:
        decode_txt(props)
    assert ei.value.max_size == MAX_TXT_BYTES
    raw = pack_txt(encode_txt(make_info()).properties.items()) + pack_txt(
        [b"pad=" + b"z" * 200] * 6)
    assert len(raw) > MAX_TXT_BYTES
    with pytest.raises(TxtRecordTooLarge):
        decode_txt(raw)


def test_unknown_keys_kinds_and_schemes_are_skipped() -> None:
    props = dict(encode_txt(make_info()).properties)
    props["future"] = "x"
    props["gen"] = "7"  # a later integer key: just skipped
    props["zz.yy.zz"] = "1"
    props["o.topic"] = "t1"
    props["ep.pubsub"] = "ws://127.0.0.1:80/x,tcp://127.0.0.1:6000"
    rec = decode_txt(wire(props))
    assert "topic" not in rec.info.offers
    assert rec.info.endpoints["pubsub"] == ("tcp://127.0.0.1:6000",)
    assert rec.skipped == ()  # unknown is normal, not malformed
    assert rec.info == make_info(node_id=rec.info.node_id, endpoints={
        **make_info().endpoints, "pubsub": ("tcp://127.0.0.1:6000",)})


# --- dotted role keys, RFC 6763 key rules, raw rdata ----------------------------------------

ROLES = {
    "control": ("tcp://127.0.0.1:5000", "ipc:///tmp/zm/a.control"),
    "pipe.jobs": ("tcp://127.0.0.1:5001", "ipc:///tmp/zm/a.pipe.jobs.0"),
    "rpc.echo": ("tcp://127.0.0.1:5002",),
    "rpc.Thumbs_v2.x": ("tcp://127.0.0.1:5003",),
    "pubsub": ("tcp://127.0.0.1:5004",),
}


def test_dotted_roles_round_trip_without_more() -> None:
    """Old code left pipe.* / rpc.* endpoints out and set more=1."""
    info = make_info(endpoints=ROLES)
    enc = encode_txt(info)
    assert not enc.truncated and "more" not in enc.properties
    assert enc.properties["ep.pipe.jobs"] == ",".join(ROLES["pipe.jobs"])
    assert list(enc.properties).index("ep.control") < list(enc.properties).index("ep.pipe.jobs")
    for record in (wire(enc.properties), pack_txt(enc.properties.items())):
        rec = decode_txt(record)
        assert rec.info == info and not rec.truncated and rec.skipped == ()


def test_a_received_dotted_role_key_is_accepted() -> None:
    """Old code dropped the whole record ("bad role name")."""
    props = dict(encode_txt(make_info()).properties)
    props["ep.pipe.jobs"] = "tcp://10.0.0.9:7000"
    props["ep.rpc.my service!"] = "tcp://10.0.0.9:7001"  # RFC 6763: any printable but '='
    rec = decode_txt(pack_txt(props.items()))
    assert rec.info.endpoints["pipe.jobs"] == ("tcp://10.0.0.9:7000",)
    assert rec.info.endpoints["rpc.my service!"] == ("tcp://10.0.0.9:7001",)


def test_keys_are_case_insensitive() -> None:
    info = make_info(endpoints=ROLES)
    enc = encode_txt(info)
    upper = [(k.upper() if not k.startswith("ep.") else "EP." + k[3:].upper()
              if "." not in k[3:] else "Ep." + k[3:].split(".", 1)[0].upper() + "."
              + k[3:].split(".", 1)[1], v) for k, v in enc.properties.items()]
    assert ("V", "1") in upper and ("EP.CONTROL", ",".join(ROLES["control"])) in upper
    assert ("Ep.PIPE.jobs", ",".join(ROLES["pipe.jobs"])) in upper
    rec = decode_txt(pack_txt(upper))
    # protocol tokens (keys, role kinds, offer kinds) are case-insensitive; names are kept
    assert rec.info == info


def test_first_of_a_repeated_key_wins() -> None:
    info = make_info()
    props = list(encode_txt(info).properties.items())
    other = uuid.uuid4().hex
    raw = pack_txt([*props, ("id", other), ("NAME", "second"), ("name", "third"),
                    ("Ep.Control", "tcp://10.9.9.9:1")])
    rec = decode_txt(raw)
    assert rec.info == info
    assert len(rec.skipped) == 4 and all("first one wins" in n for n in rec.skipped)
    # and the first is the one that counts, even when it is the bad one
    raw = pack_txt([("v", "1"), ("mesh", "m1"), ("ID", "not-hex"), ("id", info.node_id),
                    ("name", "n")])
    with pytest.raises(TxtRecordError) as ei:
        decode_txt(raw)
    assert ei.value.field == "id"
    # a mapping (python-zeroconf's properties keep case-variants apart) follows the same rule
    rec = decode_txt({b"v": b"1", b"mesh": b"m1", b"ID": other.encode(),
                      b"id": info.node_id.encode(), b"name": b"n"})
    assert rec.info.node_id == other


def test_booleans_empty_values_and_pieces_rfc6763_ignores() -> None:
    base = [("v", "1"), ("mesh", "m1"), ("id", uuid.uuid4().hex), ("name", "n")]
    rec = decode_txt(pack_txt([*base, ("more", None)]))
    assert rec.truncated  # a bare key is a boolean that is present
    assert not decode_txt(pack_txt([*base, ("more", "0")])).truncated
    assert decode_txt(pack_txt([*base, ("more", "1")])).truncated
    assert decode_txt(pack_txt([*base, ("more", "yes")])).truncated  # anything but 0
    rec = decode_txt(pack_txt([*base, ("host", ""), ("o.stream", ""), ("ep.control", "")]))
    assert rec.info.host == "" and rec.info.offers == {} and rec.info.endpoints == {}
    assert rec.skipped == ()  # empty values are allowed
    rec = decode_txt(pack_txt([*base, ("host", None), ("ep.control", None)]))
    assert len(rec.skipped) == 2  # optional keys with no value: skipped alone
    # RFC 6763 6.4: empty strings and strings with no key ("=x") are ignored
    raw = pack_txt([b"", *[f"{k}={v}".encode() for k, v in base], b"=orphan", b"",
                    b"\x01ctl=1", "k\u00e9y=1".encode()])
    rec = decode_txt(raw)
    assert rec.info.name == "n" and len(rec.skipped) == 2  # the two non-ASCII/control keys
    with pytest.raises(TxtRecordError, match="no value") as ei:
        decode_txt(pack_txt([*base[:3], ("name", None)]))
    assert ei.value.field == "name"


def test_broken_framing_rejects_the_record() -> None:
    raw = pack_txt(encode_txt(make_info()).properties.items())
    with pytest.raises(TxtRecordError, match="past the end"):
        decode_txt(raw[:-3])
    assert split_txt(b"") == [] and split_txt(b"\x00") == [b""]


@pytest.mark.parametrize("bad_role", ["Pipe.jobs", "rpc.caf\u00e9", "rpc.a=b", "pipe.", "",
                                      "x" * 33, "rpc.a\nb"])
def test_roles_that_cannot_be_keys_are_left_out_with_more(bad_role: str) -> None:
    info = make_info(endpoints={**ROLES, bad_role: ("tcp://127.0.0.1:6000",)})
    enc = encode_txt(info)
    assert enc.truncated and enc.properties["more"] == "1"
    assert not any(k == f"ep.{bad_role}" for k in enc.properties)
    rec = decode_txt(pack_txt(enc.properties.items()))
    assert rec.truncated and rec.info.endpoints == ROLES


def test_roles_equal_ignoring_case_are_written_once() -> None:
    info = make_info(endpoints={"control": ROLES["control"], "pipe.Jobs": ("tcp://127.0.0.1:1",),
                                "pipe.jobs": ("tcp://127.0.0.1:2",)})
    enc = encode_txt(info)
    assert enc.truncated
    assert [k for k in enc.properties if k.lower() == "ep.pipe.jobs"] == ["ep.pipe.Jobs"]


def test_string_size_limit_of_a_role_key() -> None:
    role = "rpc." + "s" * 200
    ep = "tcp://127.0.0.1:6000"
    info = make_info(endpoints={"control": ROLES["control"], role: (ep,)})
    enc = encode_txt(info)
    assert len(f"ep.{role}={ep}") <= 255 and not enc.truncated
    rec = decode_txt(pack_txt(enc.properties.items()))
    assert rec.info.endpoints[role] == (ep,)
    big = "rpc." + "s" * 240  # key + '=' + endpoint > 255: cannot be written
    enc = encode_txt(make_info(endpoints={"control": ROLES["control"], big: (ep,)}))
    assert enc.truncated and f"ep.{big}" not in enc.properties
    with pytest.raises(TxtRecordTooLarge):
        pack_txt([(f"ep.{big}", ep)])


@pytest.mark.parametrize(
    "ep",
    ["tcp://127.0.0.1:1", "tcp://[::1]:65535", "tcp://host.local:80", "ipc:///tmp/x", "ipc://@abs"],
)
def test_good_endpoints(ep: str) -> None:
    assert validate_endpoint(ep) is True


_text = st.one_of(st.text(max_size=40), st.binary(max_size=40))
_any = st.one_of(_text, st.none(), st.integers(), st.floats(), st.lists(st.integers(), max_size=2))
_keys = st.one_of(
    st.sampled_from(["v", "mesh", "id", "name", "host", "pk", "more", "ep.control", "o.stream",
                     "o.queue", "ep.x", b"v", b"id"]),
    _text,
    st.integers(),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _any, max_size=12))
def test_random_dicts_only_raise_typed_errors(props: dict[object, object]) -> None:
    try:
        rec = decode_txt(props)
    except TxtRecordError:
        return
    assert rec.info.mesh and len(rec.info.node_id) == 32


@settings(max_examples=200, deadline=None)
@given(
    base=st.just(None),
    overrides=st.dictionaries(
        st.sampled_from(["v", "mesh", "name", "host", "pk", "more", "ep.control", "o.stream"]),
        st.one_of(st.text(max_size=60), st.binary(max_size=60), st.none()),
        max_size=4,
    ),
)
def test_mutated_valid_records_only_raise_typed_errors(
    base: None, overrides: dict[str, object]
) -> None:
    props: dict[object, object] = dict(wire(encode_txt(make_info()).properties))
    for k, v in overrides.items():
        props[k.encode()] = v
    try:
        decode_txt(props)
    except TxtRecordError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    name=st.text(min_size=1, max_size=30).filter(str.isprintable),
    streams=st.lists(st.text(min_size=1, max_size=30), max_size=60),
)
def test_encode_then_decode_preserves_what_fits(name: str, streams: list[str]) -> None:
    info = make_info(name=name, offers={"stream": tuple(streams)})
    enc = encode_txt(info)
    assert enc.size <= DEFAULT_TXT_BUDGET
    rec = decode_txt(wire(enc.properties))
    assert rec.info.name == name
    assert rec.truncated == enc.truncated
    kept = rec.info.offers.get("stream", ())
    assert set(kept) <= set(streams)
    if not enc.truncated:
        assert kept == tuple(dict.fromkeys(streams))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_rdata_only_raises_typed_errors(raw: bytes) -> None:
    try:
        rec = decode_txt(raw)
    except TxtRecordError:
        return
    assert len(rec.info.node_id) == 32


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_rdata_only_raises_typed_errors(data: st.DataObject) -> None:
    raw = bytearray(pack_txt(encode_txt(make_info(endpoints=ROLES)).properties.items()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode_txt(bytes(raw))
    except TxtRecordError:
        pass


_queue_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,40}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(queues=st.lists(_queue_names, max_size=6, unique_by=str.lower),
       services=st.lists(_queue_names, max_size=6, unique_by=str.lower))
def test_queue_and_service_roles_round_trip(queues: list[str], services: list[str]) -> None:
    """Every role name the patterns can make (``pipe.<queue>``, ``rpc.<service>`` with the
    queue-name alphabet) is written as a key and read back unchanged."""
    eps = {"control": ("tcp://127.0.0.1:5000",)}
    for i, q in enumerate(queues):
        eps[f"pipe.{q}"] = (f"tcp://127.0.0.1:{6000 + i}",)
    for i, s in enumerate(services):
        eps[f"rpc.{s}"] = (f"tcp://127.0.0.1:{7000 + i}",)
    offers = {k: tuple(v) for k, v in (("queue", queues), ("service", services)) if v}
    info = make_info(endpoints=eps, offers=offers)
    enc = encode_txt(info)
    assert not enc.truncated
    rec = decode_txt(pack_txt(enc.properties.items()))
    assert rec.info == info and rec.skipped == ()


def test_incarnation_travels_as_inc_and_a_bad_one_is_skipped() -> None:
    enc = encode_txt(make_info(incarnation=1_764_676_800_000))
    keys = list(enc.properties)
    assert enc.properties["inc"] == "1764676800000"
    assert keys.index("inc") < keys.index("ep.control")  # with the required keys, before eps
    assert decode_txt(wire(dict(enc.properties))).info.incarnation == 1_764_676_800_000
    assert "inc" not in encode_txt(make_info()).properties  # 0: none announced (older build)
    for bad in ("x1", "-3", "1" * 20, ""):
        props = dict(enc.properties)
        props["inc"] = bad
        rec = decode_txt(wire(props))
        assert rec.info.incarnation == 0
        assert any("'inc'" in n for n in rec.skipped), (bad, rec.skipped)
