"""The publisher's fast paths: encode_new / encode_new_many and uuid7_batch (pure, no I/O)."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.envelope import (
    Event,
    EventTooLarge,
    MalformedEvent,
    decode,
    encode,
    encode_new,
    encode_new_many,
    uuid7_time,
)
from mesh.uuid7 import uuid7, uuid7_batch

payloads = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20),
    st.binary(max_size=40), st.lists(st.integers(0, 9), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=3))


# CloudEvents Strings: no control characters, noncharacters or surrogates; a subject non-empty.
ce_text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Cn")), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(payloads, st.integers(0, 2**64 - 1), st.none() | ce_text,
       st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
def test_encode_new_is_the_same_envelope_as_encode_event(data: Any, seq: int,
                                                         subject: str | None,
                                                         headers: dict[str, str] | None) -> None:
    buf = encode_new(type="t.x", source="src", stream="s.1", seq=seq, data=data,
                     subject=subject, headers=headers, correlationid="c")
    ev = decode(buf)
    assert (ev.type, ev.source, ev.stream, ev.seq, ev.subject, ev.correlationid) == (
        "t.x", "src", "s.1", seq, subject, "c")
    assert ev.headers == (headers or {})
    # Byte for byte what the Event path writes for the same id and time.
    assert encode(Event(type="t.x", source="src", stream="s.1", seq=seq, data=data,
                        subject=subject, headers=headers, correlationid="c", id=ev.id,
                        time=ev.time)) == buf


def test_encode_new_many_seqs_ids_and_bytes() -> None:
    items: list[Any] = [b"a", 1, "x", {"k": [1, 2]}, None]
    bufs = encode_new_many(items, type="t", source="s", stream="st", first_seq=41)
    evs = [decode(b) for b in bufs]
    assert [e.seq for e in evs] == [41, 42, 43, 44, 45]
    assert [e.data for e in evs] == items
    ids = [e.id for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert all(encode(e) == b for e, b in zip(evs, bufs, strict=True))
    assert encode_new_many([], type="t", source="s", stream="st", first_seq=0) == []


class Kind(enum.StrEnum):
    A = "kind.a"


def test_encode_new_validates_like_event() -> None:
    assert decode(encode_new(type=Kind.A, source="s", stream="x", seq=0)).type == "kind.a"
    bad: list[dict[str, Any]] = [
        {"type": ""}, {"type": 3}, {"source": ""}, {"seq": -1}, {"seq": True}, {"seq": 2**64},
        {"stream": b"x"}, {"data": object()}, {"data": 2**64}, {"subject": 5},
        {"headers": {"a": 1}}, {"traceparent": b"x"},
    ]
    for override in bad:
        kw: dict[str, Any] = {"type": "t", "source": "s", "stream": "x", "seq": 0, **override}
        with pytest.raises(MalformedEvent):
            encode_new(**kw)
    with pytest.raises(MalformedEvent):
        encode_new_many([1, object()], type="t", source="s", stream="x", first_seq=0)
    with pytest.raises(EventTooLarge):
        encode_new(type="t", source="s", stream="x", seq=0, data=b"x" * 100, max_size=50)
    with pytest.raises(EventTooLarge):
        encode_new_many([b"x" * 100], type="t", source="s", stream="x", first_seq=0,
                        max_size=50)
    with pytest.raises(EventTooLarge):
        encode_new(type="t", source="s", stream="x", seq=0, data="y" * 100, max_size=50)


def test_uuid7_batch_makes_exactly_the_ids_of_single_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # From the same generator state and clock reading, a batch (across two counter
    # overflows) equals as many uuid7() calls, id for id.
    import importlib
    import random

    u = importlib.import_module("mesh.uuid7")  # (the package exports a function of that name)

    def reset() -> None:
        monkeypatch.setattr(u, "_rng", random.Random(7))
        monkeypatch.setattr(u, "_last_ms", 0)
        monkeypatch.setattr(u, "_counter", 0)

    now = 1_764_676_800_123_456_789
    for n in (1, 2, 100, 2500, 9000):
        reset()
        batch = uuid7_batch(n, now)
        after = uuid7(now)
        reset()
        single = [uuid7(now) for _ in range(n)]
        assert batch == single and after == uuid7(now), n


def test_uuid7_batch_continues_the_sequence() -> None:
    # More than the 4096 counter values of one ms: the batch borrows the next ms.
    ids = [uuid7(), *uuid7_batch(5000), uuid7()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert uuid7_time(ids[-1]) >= uuid7_time(ids[0])
    assert uuid7_batch(0) == []
