"""Property tests (hypothesis) for the envelope codec and the CloudEvents conversion."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.envelope import (
    Event,
    decode,
    encode,
    from_cloudevent,
    peek,
    to_cloudevent,
    to_cloudevent_json,
)
from mesh.errors import CodecError

# Sized so the whole file runs in a few seconds on a busy 2-core machine.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=20)
nonempty = st.text(min_size=1, max_size=20)
# A CloudEvents String (spec 1.0.2: no control characters, noncharacters or lone surrogates).
ce_text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn")), max_size=20)
ce_nonempty = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn")), min_size=1,
                      max_size=20)
opt_text = st.none() | ce_text
opt_nonempty = st.none() | ce_nonempty
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | text
    | st.binary(max_size=40)
)
# Every msgpack kind, nested: lists, tuples (normalised to lists) and maps with str keys.
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(text, inner, max_size=4)
    ),
    max_leaves=12,
)
times = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    return Event(
        type=draw(ce_nonempty),
        source=draw(ce_nonempty),
        data=draw(values),
        id=draw(st.none() | ce_nonempty),
        time=draw(st.none() | times),
        subject=draw(opt_nonempty),
        datacontenttype=draw(opt_nonempty),
        correlationid=draw(opt_text),
        causationid=draw(opt_text),
        traceparent=draw(opt_text),
        headers=draw(st.dictionaries(text, text, max_size=4)),
        stream=draw(ce_text),
        seq=draw(st.none() | st.integers(min_value=0, max_value=2**64 - 1)),
        version=(1, draw(st.integers(min_value=0, max_value=300))),
        extras=draw(st.dictionaries(nonempty, values, max_size=3)),
    )


@FAST
@given(events())
def test_encode_decode_round_trip(ev: Event) -> None:
    buf = encode(ev)
    out = decode(buf)
    assert out == ev
    assert out.extras == ev.extras and out.headers == ev.headers and out.time == ev.time
    assert encode(out) == buf
    assert peek(buf) == (ev.stream, ev.seq)


@FAST
@given(events())
def test_cloudevent_round_trip(ev: Event) -> None:
    assert from_cloudevent(to_cloudevent(ev)) == ev
    assert from_cloudevent(to_cloudevent_json(ev)) == ev


def _only_codec_errors(buf: bytes) -> None:
    for fn in (decode, peek):
        try:
            fn(buf)
        except CodecError:
            pass


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_codec_errors(buf: bytes) -> None:
    _only_codec_errors(buf)


@FAST
@given(events(), st.data())
def test_truncated_encoding_raises_codec_error(ev: Event, data: st.DataObject) -> None:
    buf = encode(ev)
    cut = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
    try:
        decode(buf[:cut])
    except CodecError:
        pass
    else:  # pragma: no cover - a prefix of one msgpack object is never a whole one
        raise AssertionError("a truncated envelope decoded")
    _only_codec_errors(buf[:cut])


@FAST
@given(events(), st.data())
def test_corrupted_encoding_raises_only_codec_errors(ev: Event, data: st.DataObject) -> None:
    buf = bytearray(encode(ev))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
        buf[i] = data.draw(st.integers(min_value=0, max_value=255))
    _only_codec_errors(bytes(buf))


# msgpack objects of any shape (arrays of the right length included) rather than raw bytes,
# so the field checks behind the unpacker are exercised too.
any_msgpack = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=17) | st.dictionaries(text | st.binary(), inner),
    max_leaves=30,
)


@FAST
@given(any_msgpack)
def test_arbitrary_msgpack_raises_only_codec_errors(obj: Any) -> None:
    _only_codec_errors(msgpack.packb(obj))


@FAST
@given(st.lists(scalars | st.dictionaries(text, text, max_size=2), min_size=15, max_size=16))
def test_envelope_shaped_arrays_raise_only_codec_errors(arr: list[Any]) -> None:
    arr[0] = 1
    _only_codec_errors(msgpack.packb(arr))


@FAST
@given(
    st.dictionaries(
        text,
        st.none() | st.booleans() | st.integers() | st.floats() | text | st.lists(text),
        max_size=8,
    )
)
def test_arbitrary_cloudevent_objects_raise_only_codec_errors(obj: dict[str, Any]) -> None:
    obj.setdefault("specversion", "1.0")
    try:
        from_cloudevent(obj)
    except CodecError:
        pass


def test_time_range_edges_round_trip() -> None:
    for t in (
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ):
        ev = Event(type="t", source="s", time=t)
        assert decode(encode(ev)) == ev
        assert from_cloudevent(to_cloudevent(ev)) == ev
