"""Pipeline frame codecs: round trips and refusal of anything malformed."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ProtocolError
from patterns.pipeline import frames as f


def test_round_trips() -> None:
    r = f.Ready("q", 10, "n" * 32, "w1")
    assert f.decode(f.encode_ready(r)) == (f.READY, r)
    items = [(1, 1, 5000, None, b"x"), (2, 3, 0, "k", b""), (3, 1, 1, b"bk", b"\x00" * 100)]
    cmd, ds = f.decode(f.encode_tasks(items))
    assert cmd == f.TASK
    assert [(d.task_id, d.delivery, d.ack_wait_ms, d.key, d.payload) for d in ds] == items
    assert f.decode(f.encode_ids(f.ACK, [1, 2, 3])) == (f.ACK, [1, 2, 3])
    assert f.decode(f.encode_ids(f.IN_PROGRESS, [7])) == (f.IN_PROGRESS, [7])
    assert f.decode(f.encode_ids(f.BYE, [])) == (f.BYE, [])
    fail = f.Failure(4, 1.5, "", "ValueError", "bad", "Traceback...")
    assert f.decode(f.encode_failures(f.NACK, [fail])) == (f.NACK, [fail])
    term = f.Failure(5, None, "never", None, None, None)
    assert f.decode(f.encode_failures(f.TERM, [term])) == (f.TERM, [term])


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\x01\x03"],
        [b"\x01\x03", b"\x90", b"extra"],
        [b"\x02\x03", msgpack.packb([1])],  # unknown version
        [b"\x01\x7f", msgpack.packb([1])],  # unknown command
        [b"\x01", msgpack.packb([1])],  # short header
        [b"\x01\x03", b"\xc1"],  # invalid msgpack
        [b"\x01\x03", msgpack.packb({"a": 1})],
        [b"\x01\x03", msgpack.packb([-1])],
        [b"\x01\x03", msgpack.packb([True])],
        [b"\x01\x03", msgpack.packb(["1"])],
        [b"\x01\x01", msgpack.packb(["q", -1, "n", "w"])],
        [b"\x01\x01", msgpack.packb(["q", 1, "n"])],
        [b"\x01\x01", msgpack.packb([1, 1, "n", "w"])],
        [b"\x01\x02", msgpack.packb([[1, 1, 1, None, "str-payload"]])],
        [b"\x01\x02", msgpack.packb([[1, 0, 1, None, b"p"]])],
        [b"\x01\x02", msgpack.packb([[1, 1, 1, 5, b"p"]])],
        [b"\x01\x04", msgpack.packb([[1, -1.0, "", None, None, None]])],
        [b"\x01\x04", msgpack.packb([[1, float("nan"), "", None, None, None]])],
        [b"\x01\x04", msgpack.packb([[1, None, 3, None, None, None]])],
        [b"\x01\x06", msgpack.packb([[1, None, "", 3, None, None]])],
        [b"\x01\x06", msgpack.packb([[1, None, ""]])],
    ],
)
def test_malformed_frames_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        f.decode(frames)


def test_encoders_refuse_wrong_command() -> None:
    with pytest.raises(ProtocolError):
        f.encode_ids(f.NACK, [1])
    with pytest.raises(ProtocolError):
        f.encode_failures(f.ACK, [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_decoder_never_crashes_on_garbage(frames: list[bytes]) -> None:
    try:
        f.decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**62),
            st.integers(1, 1000),
            st.integers(0, 10**9),
            st.one_of(st.none(), st.text(max_size=8), st.binary(max_size=8)),
            st.binary(max_size=64),
        ),
        max_size=20,
    )
)
def test_task_round_trip_property(items: list[tuple[int, int, int, object, bytes]]) -> None:
    _cmd, ds = f.decode(f.encode_tasks(items))  # type: ignore[arg-type]
    assert [(d.task_id, d.delivery, d.ack_wait_ms, d.key, d.payload) for d in ds] == items


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), max_size=50))
def test_ack_round_trip_property(ids: list[int]) -> None:
    assert f.decode(f.encode_ids(f.ACK, ids)) == (f.ACK, ids)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_body_garbage_under_valid_header(body: bytes) -> None:
    for cmd in f.COMMAND_NAMES:
        try:
            f.decode([f.header(cmd), body])
        except ProtocolError:
            pass


def test_pipeline_exports_are_sorted_and_importable() -> None:
    import patterns.pipeline as pp

    assert pp.__all__ == sorted(pp.__all__)
    for name in pp.__all__:
        assert getattr(pp, name) is not None
