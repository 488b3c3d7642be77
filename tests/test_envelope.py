"""Unit tests for mesh.envelope and mesh.uuid7: pure functions, no I/O."""

from __future__ import annotations

import copy
import os
import pickle
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest

from mesh import envelope
from mesh.envelope import (
    DEFAULT_MAX_EVENT_BYTES,
    ENVELOPE_VERSION,
    MAX_DATA_DEPTH,
    Event,
    decode,
    encode,
    peek,
    uuid7,
    uuid7_time,
)
from mesh.errors import CodecError, EventTooLarge, MalformedEvent, UnsupportedVersion
from mesh.uuid7 import uuid7_int


@pytest.fixture(autouse=True)
def _uuid7_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the id generator back after each test: a test that feeds uuid7() a clock in 2033
    would leave every later id of this process (monotonic) in 2033."""
    import importlib

    u = importlib.import_module("mesh.uuid7")  # (the package exports a function of that name)
    for name in ("_last_ms", "_counter", "_rand_b", "_prefix", "_suffix"):
        monkeypatch.setattr(u, name, getattr(u, name))


def make(**kw: Any) -> Event:
    base: dict[str, Any] = {"type": "sensor.reading", "source": "node-1/sensor", "data": b"x" * 100}
    base.update(kw)
    return Event(**base)


def wire(ev: Event) -> list[Any]:
    """The decoded msgpack array of an event, to tamper with."""
    arr = msgpack.unpackb(encode(ev))
    assert isinstance(arr, list)
    return arr


def pack(arr: Any) -> bytes:
    out = msgpack.packb(arr, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


# --- construction -------------------------------------------------------------------------


def test_event_defaults_fill_id_time_and_version() -> None:
    before = datetime.now(UTC)
    ev = make()
    after = datetime.now(UTC)
    assert len(ev.id) == 36 and ev.id[14] == "7"
    assert before - timedelta(milliseconds=1) <= ev.time <= after
    assert ev.time.tzinfo is UTC
    assert ev.version == ENVELOPE_VERSION == (1, 0)
    assert ev.stream == "" and ev.seq is None and ev.headers == {} and dict(ev.extras) == {}
    assert ev.subject is None and ev.datacontenttype is None and ev.traceparent is None
    assert ev.time_us == (ev.time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def test_event_time_is_converted_to_utc() -> None:
    t = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    ev = make(time=t)
    assert ev.time == t and ev.time.tzinfo is UTC and ev.time.hour == 5


def test_event_naive_time_refused() -> None:
    with pytest.raises(MalformedEvent) as ei:
        make(time=datetime(2024, 1, 1))
    assert ei.value.field == "time"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", ""),
        ("type", 3),
        ("type", None),
        ("source", b"node"),
        ("source", ""),
        ("id", ""),
        ("id", 5),
        ("subject", 1),
        ("datacontenttype", b"x"),
        ("correlationid", 1.5),
        ("causationid", ["a"]),
        ("traceparent", 7),
        ("headers", {"a": 1}),
        ("headers", {1: "a"}),
        ("headers", ["a"]),
        ("stream", None),
        ("stream", 3),
        ("seq", -1),
        ("seq", 1.0),
        ("seq", True),
        ("seq", "3"),
        ("seq", 1 << 64),
        ("time", 12345),
        ("version", (1,)),
        ("version", [1, 0]),
        ("version", (1, -1)),
        ("extras", {"": 1}),
        ("extras", {1: 1}),
        ("extras", ["x"]),
        ("data", {1: "int key"}),
        ("data", {"s": {1, 2}}),
        ("data", object()),
        ("data", 1 << 64),
        ("data", -(1 << 63) - 1),
    ],
)
def test_event_mistyped_field_refused_with_field_name(field: str, value: Any) -> None:
    with pytest.raises(MalformedEvent) as ei:
        make(**{field: value})
    expected = "extras" if field == "extras" else field
    assert ei.value.field == expected
    assert isinstance(ei.value, ValueError)


def test_event_unsupported_major_refused() -> None:
    with pytest.raises(UnsupportedVersion) as ei:
        make(version=(2, 0))
    assert ei.value.version == (2, 0) and ei.value.supported == (1,)


def test_event_data_too_deep_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_DATA_DEPTH + 1):
        deep = [deep]
    with pytest.raises(MalformedEvent, match="deeper"):
        make(data=deep)
    ok: Any = 1
    for _ in range(MAX_DATA_DEPTH):
        ok = [ok]
    assert decode(encode(make(data=ok))).data == ok


def test_event_normalises_values_that_would_not_round_trip() -> None:
    ev = make(data={"pt": (1, 2), "raw": bytearray(b"ab"), "mv": memoryview(b"cd")})
    assert ev.data == {"pt": [1, 2], "raw": b"ab", "mv": b"cd"}
    assert type(ev.data["raw"]) is bytes
    assert decode(encode(ev)) == ev
    assert make(data=(1, (2, 3))).data == [1, [2, 3]]


def test_event_copies_containers() -> None:
    headers = {"k": "v"}
    data = {"a": [1]}
    ev = make(headers=headers, data=data)
    headers["k"] = "changed"
    data["a"].append(2)
    assert ev.headers == {"k": "v"} and ev.data == {"a": [1]}


def test_event_empty_non_mapping_headers_refused() -> None:
    for field in ("headers", "extras"):
        with pytest.raises(MalformedEvent) as ei:
            make(**{field: []})
        assert ei.value.field == field


def test_decoded_and_replaced_events_are_events() -> None:
    ev = make()
    for other in (decode(encode(ev)), ev.replace(seq=1), pickle.loads(pickle.dumps(ev))):
        assert type(other) is Event
        with pytest.raises(AttributeError):
            other.stream = "x"  # type: ignore[misc]


def test_event_is_immutable() -> None:
    ev = make()
    with pytest.raises(AttributeError, match="replace"):
        ev.seq = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del ev.stream  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.extras["x"] = 1  # type: ignore[index]


def test_event_positional_arguments_refused() -> None:
    with pytest.raises(TypeError):
        Event("t", "s")  # type: ignore[misc]


def test_replace_changes_and_validates_only_given_fields() -> None:
    ev = make(headers={"a": "b"})
    ev2 = ev.replace(stream="orders", seq=42)
    assert (ev2.stream, ev2.seq) == ("orders", 42)
    assert (ev.stream, ev.seq) == ("", None)
    assert ev2.id == ev.id and ev2.time == ev.time and ev2.headers == ev.headers
    assert ev2 != ev
    t = datetime(2020, 1, 1, tzinfo=UTC)
    assert ev.replace(time=t).time == t
    assert ev.replace(data=(1, 2)).data == [1, 2]
    assert ev.replace(extras={"x": 1}).extras == {"x": 1}
    with pytest.raises(MalformedEvent) as ei:
        ev.replace(seq=-5)
    assert ei.value.field == "seq"
    with pytest.raises(MalformedEvent) as ei:
        ev.replace(nosuchfield=1)
    assert ei.value.field == "nosuchfield"
    with pytest.raises(UnsupportedVersion):
        ev.replace(version=(3, 0))


def test_equality_and_hash() -> None:
    ev = make(headers={"a": "b"}, extras={"z": 1})
    same = ev.replace()
    assert same == ev and hash(same) == hash(ev)
    assert ev != ev.replace(headers={"a": "c"})
    assert ev != ev.replace(extras={"z": 2})
    assert ev != ev.replace(data=b"other")
    assert ev != "not an event"
    assert len({ev, same}) == 1


def test_pickle_and_copy_round_trip() -> None:
    ev = make(stream="s", seq=3, extras={"x": [1]}, headers={"h": "v"})
    assert pickle.loads(pickle.dumps(ev)) == ev
    assert copy.copy(ev) == ev and copy.deepcopy(ev) == ev


def test_repr_is_short_and_informative() -> None:
    r = repr(make(data=b"x" * 10_000, stream="s", seq=1))
    assert "sensor.reading" in r and "<10000 bytes>" in r and "seq=1" in r and len(r) < 300


# --- codec ----------------------------------------------------------------------------------


def test_round_trip_full_event() -> None:
    ev = Event(
        type="order.created",
        source="svc/orders",
        data={"n": 1, "f": 1.5, "s": "x", "b": b"\x00", "l": [None, True], "m": {"k": {}}},
        subject="order/42",
        datacontenttype="application/msgpack",
        correlationid="c-1",
        causationid="e-0",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        headers={"tenant": "acme", "": ""},
        stream="orders",
        seq=2**64 - 1,
        extras={"future": {"nested": [1, 2]}},
        time=datetime(1, 1, 1, tzinfo=UTC),
    )
    out = decode(encode(ev))
    assert out == ev
    assert out.extras == {"future": {"nested": [1, 2]}}
    assert out.time == datetime(1, 1, 1, tzinfo=UTC)


def test_layout_is_a_fixed_array_version_first() -> None:
    ev = make(stream="s", seq=7, time=datetime(2024, 1, 1, tzinfo=UTC), id="abc")
    arr = wire(ev)
    assert arr[:8] == [1, 0, "s", 7, "abc", 1704067200000000, "sensor.reading", "node-1/sensor"]
    assert arr[13:] == [{}, b"x" * 100]
    assert len(arr) == 15  # no extras map when there are no extras
    assert len(wire(make(extras={"a": 1}))) == 16


def test_decode_accepts_bytearray_and_memoryview() -> None:
    ev = make()
    buf = encode(ev)
    assert decode(bytearray(buf)) == ev
    assert decode(memoryview(buf)) == ev


def test_encode_oversize_refused() -> None:
    with pytest.raises(EventTooLarge) as ei:
        encode(make(data=b"x" * 2000), max_size=1000)
    assert ei.value.max_size == 1000 and ei.value.size >= 2000
    # Data small enough on its own, envelope just over: the exact size is reported.
    ev = make(data=b"x" * 950)
    n = len(encode(ev))
    with pytest.raises(EventTooLarge) as ei:
        encode(ev, max_size=n - 1)
    assert ei.value.size == n
    assert len(encode(ev, max_size=n)) == n


def test_encode_default_limit_is_one_mib() -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 1 << 20
    with pytest.raises(EventTooLarge):
        encode(make(data=b"x" * DEFAULT_MAX_EVENT_BYTES))
    big = make(data=b"x" * (DEFAULT_MAX_EVENT_BYTES - 200))
    assert decode(encode(big)) == big


def test_decode_oversize_refused_before_unpacking() -> None:
    buf = encode(make(data=b"x" * 2000))
    with pytest.raises(EventTooLarge) as ei:
        decode(buf, max_size=1000)
    assert ei.value.size == len(buf)


def test_decode_hostile_length_prefix_does_not_allocate() -> None:
    # Length prefixes claiming gigabytes in a few bytes must fail fast, not allocate.
    prefix = pack(wire(make())[:14])
    assert prefix[0] == 0x9E  # fixarray(14): replace its header by fixarray(15) + a bin32
    for hostile in (
        b"\x9f" + prefix[1:] + b"\xc6\xff\xff\xff\xf0" + b"x" * 10,  # bin32 of ~4 GiB
        b"\x9f" + prefix[1:] + b"\xdb\xff\xff\xff\xf0" + b"x" * 10,  # str32 of ~4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
    ):
        with pytest.raises(MalformedEvent):
            decode(hostile)


def test_encode_unencodable_string_refused() -> None:
    with pytest.raises(MalformedEvent):
        encode(make(subject="\ud800"))
    # The per-thread packer is usable again afterwards.
    ev = make()
    assert decode(encode(ev)) == ev


def test_encode_non_event_refused() -> None:
    with pytest.raises(MalformedEvent):
        encode({"type": "x"})  # type: ignore[arg-type]


def _tampered(index: int, value: Any) -> bytes:
    arr = wire(make(stream="s", seq=1))
    arr[index] = value
    return pack(arr)


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (1, -1, "version"),
        (1, "0", "version"),
        (2, None, "stream"),
        (2, b"s", "stream"),
        (3, -1, "seq"),
        (3, "1", "seq"),
        (3, True, "seq"),
        (4, "", "id"),
        (4, b"\x01" * 16, "id"),
        (5, "2024", "time"),
        (5, 1 << 62, "time"),
        (5, 1.5, "time"),
        (6, "", "type"),
        (6, None, "type"),
        (7, 1, "source"),
        (8, 1, "subject"),
        (9, b"x", "datacontenttype"),
        (10, [], "correlationid"),
        (11, {}, "causationid"),
        (12, 0, "traceparent"),
        (13, None, "headers"),
        (13, {"a": 1}, "headers"),
        (13, {"a": b"b"}, "headers"),
        (13, [], "headers"),
    ],
)
def test_decode_mistyped_field_refused_with_field_name(index: int, value: Any, field: str) -> None:
    with pytest.raises(MalformedEvent) as ei:
        decode(_tampered(index, value))
    assert ei.value.field == field


def test_decode_missing_fields_refused() -> None:
    arr = wire(make())
    for n in (1, 2, 14):
        with pytest.raises(MalformedEvent):
            decode(pack(arr[:n]))
    with pytest.raises(MalformedEvent):
        decode(pack([]))
    with pytest.raises(MalformedEvent):
        decode(pack([*arr, {}, "seventeenth"]))


def test_decode_extras_must_be_a_map_with_str_keys() -> None:
    arr = wire(make())
    for bad in ([1], "x", {"": 1}, {b"k": 1}):
        with pytest.raises(MalformedEvent) as ei:
            decode(pack([*arr, bad]))
        assert ei.value.field == "extras"
    with pytest.raises(MalformedEvent):  # refused by the unpacker already
        decode(pack([*arr, {1: 2}]))
    # An empty map is legal (encoders omit it, but must be accepted).
    assert decode(pack([*arr, {}])).extras == {}


def test_decode_not_an_array_refused() -> None:
    for obj in ({"v": 1}, 1, "x", None, b"bytes"):
        with pytest.raises(MalformedEvent):
            decode(pack(obj))


@pytest.mark.parametrize("buf", [b"", b"\xc1", b"\x9f", b"\x9f\x01", b"\xff" * 40])
def test_decode_garbage_refused(buf: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode(buf)


def test_decode_trailing_bytes_refused() -> None:
    with pytest.raises(MalformedEvent):
        decode(encode(make()) + b"\x00")


def test_decode_invalid_utf8_refused() -> None:
    buf = encode(make(subject="abc"))
    bad = buf.replace(b"\xa3abc", b"\xa3a\xffc")
    assert bad != buf
    with pytest.raises(MalformedEvent):
        decode(bad)


def test_decode_non_bytes_refused() -> None:
    with pytest.raises(MalformedEvent):
        decode(12345)  # type: ignore[arg-type]
    with pytest.raises(MalformedEvent):
        decode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("major", [0, 2, 255, 70000])
def test_decode_other_major_refused(major: int) -> None:
    with pytest.raises(UnsupportedVersion) as ei:
        decode(_tampered(0, major))
    assert ei.value.version == (major, 0) and ei.value.supported == (1,)


def test_decode_future_major_with_another_layout_refused_by_version() -> None:
    # A v2 envelope may look nothing like v1; element 0 alone decides.
    with pytest.raises(UnsupportedVersion):
        decode(pack([2, {"whatever": "layout"}]))
    with pytest.raises(UnsupportedVersion):
        decode(pack([9]))


def test_decode_mistyped_major_refused() -> None:
    for bad in ("1", None, 1.0, True):
        with pytest.raises(MalformedEvent) as ei:
            decode(_tampered(0, bad))
        assert ei.value.field == "version"


def test_decode_higher_minor_accepted_and_extras_preserved() -> None:
    arr = wire(make(stream="s", seq=1))
    arr[1] = 7
    arr.append({"newfield": [1, 2], "other": {"x": b"y"}})
    ev = decode(pack(arr))
    assert ev.version == (1, 7)
    assert ev.extras == {"newfield": [1, 2], "other": {"x": b"y"}}
    # Re-encoding keeps the minor and every unknown field: nothing is lost in transit.
    assert msgpack.unpackb(encode(ev)) == arr
    assert decode(encode(ev)) == ev


def test_decode_data_of_every_kind() -> None:
    values: list[Any] = [
        None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.25, "", "héllo", b"", b"\x00\xff",
        [], {}, [1, [2, [3]]], {"a": {"b": [None]}}, {b"k": 1},
        msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 2),
    ]  # fmt: skip
    for v in values:
        ev = make(data=v)
        assert decode(encode(ev)) == ev, v


# --- peek -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "seq"),
    [
        ("", None),
        ("s", 0),
        ("orders", 127),
        ("x" * 31, 128),
        ("y" * 32, 2**16),
        ("é" * 200, 2**64 - 1),
    ],
)
def test_peek_returns_stream_and_seq(stream: str, seq: int | None) -> None:
    buf = encode(make(stream=stream, seq=seq))
    assert peek(buf) == (stream, seq)
    assert peek(memoryview(buf)) == (stream, seq)
    assert peek(bytearray(buf)) == (stream, seq)


def test_peek_with_extras_and_non_canonical_forms() -> None:
    assert peek(encode(make(stream="s", seq=5, extras={"a": 1}))) == ("s", 5)
    arr = wire(make(stream="s", seq=5))
    # seq written as int64 and stream as str16 by some other encoder: falls back to decode.
    raw = pack(arr)
    other = raw.replace(b"\xa1s\x05", b"\xda\x00\x01s\xd3" + (5).to_bytes(8, "big"))
    assert other != raw
    assert peek(other) == ("s", 5)
    assert decode(other).seq == 5


def test_peek_refuses_what_decode_refuses() -> None:
    with pytest.raises(UnsupportedVersion):
        peek(_tampered(0, 2))
    for bad in (b"", b"\x9f", b"\xc1\x00\x00\x00\x00", b"\x9f\x01\x00\xa5ab", "str"):
        with pytest.raises(MalformedEvent):
            peek(bad)  # type: ignore[arg-type]
    with pytest.raises(MalformedEvent):
        peek(_tampered(3, -1))


# --- uuid7 ----------------------------------------------------------------------------------


def test_uuid7_format_version_variant_and_time() -> None:
    before = datetime.now(UTC)
    u = uuid7()
    assert len(u) == 36 and u == u.lower()
    value = int(u.replace("-", ""), 16)
    assert (value >> 76) & 0xF == 7 and (value >> 62) & 0b11 == 0b10
    t = uuid7_time(u)
    assert before - timedelta(milliseconds=2) <= t <= datetime.now(UTC)
    assert uuid7_time(u.upper()) == t


def test_uuid7_monotonic_for_many_ids_in_one_millisecond() -> None:
    now = 1_700_000_000_000_000_000
    ids = [uuid7(now) for _ in range(10_000)]  # same ms: counter, then borrowed ms
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ints = [uuid7_int(now) for _ in range(100)]
    assert ints == sorted(ints)


def test_uuid7_monotonic_when_clock_steps_back() -> None:
    a = uuid7(2_000_000_000_000_000_000)
    b = uuid7(1_000_000_000_000_000_000)
    assert b > a


def test_uuid7_unique_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        out[i].extend(uuid7() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    flat = [u for chunk in out for u in chunk]
    assert len(set(flat)) == 20_000
    for chunk in out:
        assert chunk == sorted(chunk)


def test_uuid7_fork_child_does_not_repeat_parent() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.write(w, "".join(uuid7() for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(uuid7() for _ in range(50))
    child_ids = {child[i : i + 36] for i in range(0, len(child), 36)}
    parent_ids = {parent[i : i + 36] for i in range(0, len(parent), 36)}
    assert len(child_ids) == 50
    # Same millisecond and counter are possible; the 62 random bits must differ.
    assert not {u[19:] for u in child_ids} & {u[19:] for u in parent_ids}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-uuid",
        "0190a3b4-1234-4abc-8def-0123456789ab",  # version 4
        "0190a3b4-1234-7abc-cdef-0123456789ab",  # variant 110
        "0190a3b4_1234-7abc-8def-0123456789ab",
        "0190a3b4-1234-7abc-8def-0123456789a_",
        "+190a3b4-1234-7abc-8def-0123456789ab",
        123,
    ],
)
def test_uuid7_time_refuses_non_uuid7(bad: Any) -> None:
    with pytest.raises(MalformedEvent) as ei:
        uuid7_time(bad)
    assert ei.value.field == "id"


def test_public_names() -> None:
    assert len(set(envelope.__all__)) == len(envelope.__all__)
    for name in envelope.__all__:
        assert hasattr(envelope, name)
    assert issubclass(MalformedEvent, CodecError)
