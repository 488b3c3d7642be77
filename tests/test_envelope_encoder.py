"""NewEventEncoder (the plain publish() path) gives encode_new's bytes and its errors."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.envelope import (
    Event,
    EventTooLarge,
    MalformedEvent,
    NewEventEncoder,
    decode,
    encode,
    encode_new,
)

_DATAS: list[Any] = [None, b"", b"x" * 100, b"y" * 70_000, "text", 0, -1, 2**64 - 1, 1.5,
                     True, [1, "a", b"b"], {"k": {"n": [None]}}, bytearray(b"ba"), (1, 2)]


def _fields(ev: Event) -> tuple[Any, ...]:
    return (ev.version, ev.stream, ev.seq, ev.type, ev.source, ev.subject, ev.headers, ev.data,
            ev.datacontenttype, ev.correlationid, ev.causationid, ev.traceparent, ev.extras)


@pytest.mark.parametrize("data", _DATAS, ids=range(len(_DATAS)))
def test_same_event_and_canonical_bytes_as_encode_new(data: Any) -> None:
    enc = NewEventEncoder("node/p", "s.t")
    for seq in (0, 1, 300, 2**40):
        buf = enc.encode(seq, "m.t", data)
        ev = decode(buf)
        ref = decode(encode_new(type="m.t", source="node/p", stream="s.t", seq=seq, data=data))
        assert _fields(ev) == _fields(ref)
        assert encode(ev) == buf  # the canonical encoding of that event, byte for byte
        assert ev.id > ref.id or ev.id < ref.id  # a fresh id each


def test_ids_increase_and_payload_not_kept() -> None:
    enc = NewEventEncoder("node/p", "s.t")
    ids = [decode(enc.encode(i, "m", b"p")).id for i in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000
    assert enc._arr[14] is None  # the last payload is not held by the encoder


def test_errors_as_encode_new_and_encoder_usable_after() -> None:
    enc = NewEventEncoder("node/p", "s.t", max_size=1000)
    for bad_type in ("", "a\nb", 5, None, ["x"]):
        with pytest.raises(MalformedEvent) as ei:
            enc.encode(1, bad_type, b"x")
        assert ei.value.field == "type"
    with pytest.raises(EventTooLarge):
        enc.encode(1, "m", b"x" * 1001)
    with pytest.raises(EventTooLarge):
        enc.encode(1, "m", "x" * 990)  # the envelope, not the payload, is over
    with pytest.raises(MalformedEvent):
        enc.encode(1, "m", {1: "int key"})
    with pytest.raises(MalformedEvent):
        enc.encode(1, "m", "\ud800")  # lone surrogate: msgpack cannot encode it
    assert decode(enc.encode(2, "m", b"ok")).data == b"ok"
    many = NewEventEncoder("node/p", "s.t")
    for i in range(NewEventEncoder.TYPES_KEPT + 10):  # past the cache: still checked
        assert decode(many.encode(i, f"t{i}", None)).type == f"t{i}"
    with pytest.raises(MalformedEvent):
        many.encode(0, "bad\ttype", None)


def test_bad_source_or_stream_refused_at_construction() -> None:
    with pytest.raises(MalformedEvent):
        NewEventEncoder("", "s.t")
    with pytest.raises(MalformedEvent):
        NewEventEncoder("node/p", 5)  # type: ignore[arg-type]
