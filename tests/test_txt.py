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
        ({"pk": "short"}, "pk"),
        ({"more": "yes"}, "more"),
        ({"ep.control": "tcp://127.0.0.1"}, "ep.control"),
        ({"ep.control": "tcp://127.0.0.1:0"}, "ep.control"),
        ({"ep.control": "tcp://127.0.0.1:99999"}, "ep.control"),
        ({"ep.control": "tcp://*:5000"}, "ep.control"),
        ({"ep.control": "tcp://0.0.0.0:5000"}, "ep.control"),
        ({"ep.control": "garbage"}, "ep.control"),
        ({"ep.control": "ipc://relative/path"}, "ep.control"),
        ({"ep.control": "tcp://[::zz]:1"}, "ep.control"),
        ({"ep.BAD": "tcp://127.0.0.1:1"}, "ep.BAD"),
        ({"o.stream": "a,,b"}, "o.stream"),
    ],
)
def test_bad_field_is_rejected(change: dict[str, str], field: str) -> None:
    props = dict(encode_txt(make_info()).properties)
    props.update(change)
    with pytest.raises(TxtRecordError) as ei:
        decode_txt(wire(props))
    assert ei.value.field == field
    assert isinstance(ei.value, ProtocolError)


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


def test_non_utf8_and_wrong_types_are_rejected() -> None:
    props: dict[object, object] = dict(wire(encode_txt(make_info()).properties))
    bad = dict(props)
    bad[b"name"] = b"\xff\xfe"
    with pytest.raises(TxtRecordError, match="UTF-8"):
        decode_txt(bad)
    bad = dict(props)
    bad[b"name"] = 42
    with pytest.raises(TxtRecordError, match="wrong type"):
        decode_txt(bad)
    with pytest.raises(TxtRecordError, match="mapping"):
        decode_txt([("v", "1")])


def test_oversize_record_and_string_are_rejected() -> None:
    props = dict(wire(encode_txt(make_info()).properties))
    props[b"x"] = b"y" * 300
    with pytest.raises(TxtRecordTooLarge):
        decode_txt(props)
    props = dict(wire(encode_txt(make_info()).properties))
    for i in range(10):
        props[f"pad{i}".encode()] = b"z" * 200
    with pytest.raises(TxtRecordTooLarge) as ei:
        decode_txt(props)
    assert ei.value.max_size == MAX_TXT_BYTES


def test_unknown_keys_kinds_and_schemes_are_skipped() -> None:
    props = dict(encode_txt(make_info()).properties)
    props["future"] = "x"
    props["o.topic"] = "t1"
    props["ep.pub"] = "ws://127.0.0.1:80/x,tcp://127.0.0.1:6000"
    rec = decode_txt(wire(props))
    assert "topic" not in rec.info.offers
    assert rec.info.endpoints["pub"] == ("tcp://127.0.0.1:6000",)


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
