"""Fast unit tests of the pure log format functions (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.log import format as fmt

payloads = st.lists(st.binary(max_size=300), min_size=1, max_size=20)


@given(payloads, st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_batch_round_trip(pls: list[bytes], base: int, ts: int) -> None:
    data = fmt.encode_batch(base, ts, pls)
    hdr = fmt.check_batch(data, 0)
    assert (hdr.base_offset, hdr.timestamp_ns, hdr.records, hdr.length) == (base, ts, len(pls),
                                                                             len(data))
    assert fmt.batch_payloads(data, 0, hdr) == pls


@given(st.binary(max_size=500), st.integers(0, 2**40))
def test_one_record_batch_matches_general_encoder(p: bytes, base: int) -> None:
    assert fmt.encode_one(base, 7, p) == fmt.encode_batch(base, 7, [p])


@given(payloads, st.data())
@settings(max_examples=200)
def test_any_single_bit_flip_is_detected(pls: list[bytes], data: st.DataObject) -> None:
    raw = bytearray(fmt.encode_batch(5, 1, pls))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(fmt.FrameError):
        fmt.check_batch(bytes(raw), 0)


@given(payloads, st.data())
def test_truncated_batch_is_incomplete(pls: list[bytes], data: st.DataObject) -> None:
    raw = fmt.encode_batch(0, 0, pls)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(fmt.FrameError) as ei:
        fmt.check_batch(raw[:cut], 0)
    assert ei.value.incomplete


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_frame_error(junk: bytes) -> None:
    try:
        fmt.check_batch(junk, 0)
    except fmt.FrameError:
        pass


def test_skip_and_limit_slice_the_batch() -> None:
    pls = [bytes([i]) * i for i in range(10)]
    raw = fmt.encode_batch(100, 0, pls)
    hdr = fmt.check_batch(raw, 0)
    assert fmt.batch_payloads(raw, 0, hdr, skip=3, limit=4) == pls[3:7]


def test_resync_finds_the_next_good_batch_after_garbage() -> None:
    a = fmt.encode_batch(0, 0, [b"a" * 50])
    b = fmt.encode_batch(1, 0, [b"b" * 50])
    buf = a[:10] + b"\x00" * 40 + b
    found = fmt.find_next_batch(buf, 1, len(buf), 1)
    assert found is not None and found[0] == 50 and found[1].base_offset == 1


def test_segment_names_round_trip() -> None:
    assert fmt.parse_segment_name(fmt.segment_name(42)) == 42
    assert fmt.parse_segment_name("junk.log") is None
    assert fmt.parse_segment_name(fmt.index_name(42)) is None


def test_index_decoding_ignores_a_torn_last_entry() -> None:
    data = fmt.encode_index_entry(1, 2, 3) + fmt.encode_index_entry(4, 5, 6)[:10]
    assert fmt.decode_index(data) == [(1, 2, 3)]
