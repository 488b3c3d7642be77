"""The control channel codec: pure functions, no sockets."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import control
from mesh.errors import FrameTooLarge, ProtocolError, UnsupportedProtocol
from mesh.peers import PeerInfo

NODE = "0123456789abcdef0123456789abcdef"


def info(**kw: object) -> PeerInfo:
    base: dict[str, object] = dict(
        node_id=NODE, name="n", mesh="m", host="h",
        endpoints={"control": ("tcp://127.0.0.1:1", "ipc:///tmp/x.sock")},
        offers={"stream": ("a", "b")},
    )
    base.update(kw)
    return PeerInfo(**base)  # type: ignore[arg-type]


def test_header_round_trip_and_layout() -> None:
    h = control.encode_header("pubsub.replay_req")
    assert h[:2] == b"ZM" and h[2] == 1 and h[3] == len("pubsub.replay_req")
    assert control.decode_header(h) == "pubsub.replay_req"


@pytest.mark.parametrize(
    "frame", [b"", b"XX\x01\x04ping", b"ZM\x01\x05ping", b"ZM\x01\x04PI\xffG", b"ZM\x01\x04PING"]
)
def test_bad_header_is_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        control.decode_header(frame)


def test_unknown_major_version_is_refused_with_versions() -> None:
    with pytest.raises(UnsupportedProtocol) as exc:
        control.decode_header(b"ZM\x63\x04ping")
    assert exc.value.version == 99 and exc.value.supported == (1,)


@pytest.mark.parametrize("kind", ["", "A", ".x", "x" * 65, "a b", 3])
def test_invalid_kinds_are_refused(kind: object) -> None:
    with pytest.raises(ProtocolError):
        control.encode_header(kind)  # type: ignore[arg-type]


def test_batch_round_trip_and_one_bad_pair_spares_the_rest() -> None:
    frames = control.encode_frames(
        [("ping", msgpack.packb(None)), ("x.y", msgpack.packb({"a": [1, b"b"]}))]
    )
    msgs = control.decode_frames(frames)
    assert [(m.kind, m.body, m.error) for m in msgs] == [
        ("ping", None, None), ("x.y", {"a": [1, b"b"]}, None)
    ]
    frames[1] = b"\xc1"  # never-used msgpack byte
    frames.extend([b"garbage", b"\x90"])
    msgs = control.decode_frames(frames)
    assert msgs[0].error is not None and msgs[1].error is None and msgs[2].error is not None


@pytest.mark.parametrize("n", [0, 1, 3])
def test_odd_or_empty_frame_count_is_refused(n: int) -> None:
    with pytest.raises(ProtocolError):
        control.decode_frames([b"ZM\x01\x04ping"] * n)


def test_encode_body_limits() -> None:
    with pytest.raises(FrameTooLarge) as exc:
        control.encode_body(b"x" * 100, 50)
    assert exc.value.max_size == 50 and exc.value.size > 100
    with pytest.raises(ProtocolError):
        control.encode_body(object(), 1000)


def test_peerinfo_and_hello_round_trip() -> None:
    i = info()
    assert control.peerinfo_from_wire(control.peerinfo_to_wire(i)) == i
    h = control.Hello(i, dial=7, ack=None, reply=True)
    wire = msgpack.unpackb(msgpack.packb(control.hello_to_wire(h)))
    assert control.hello_from_wire(wire) == h


@pytest.mark.parametrize(
    "patch",
    [
        {"node_id": "nope"}, {"name": 1}, {"mesh": None}, {"version": "1"}, {"version": True},
        {"endpoints": {"control": "tcp://x"}}, {"offers": []}, {"public_key": 5},
    ],
)
def test_bad_peerinfo_fields_are_refused(patch: dict[str, object]) -> None:
    wire = control.peerinfo_to_wire(info())
    wire.update(patch)
    with pytest.raises(ProtocolError):
        control.peerinfo_from_wire(wire)


def test_peer_of_newer_major_version_is_refused() -> None:
    wire = control.peerinfo_to_wire(info())
    wire["version"] = 2
    with pytest.raises(UnsupportedProtocol):
        control.peerinfo_from_wire(wire)


def test_unknown_offer_kinds_are_dropped_not_fatal() -> None:
    wire = control.peerinfo_to_wire(info())
    wire["offers"] = {"stream": ["s"], "future-kind": ["z"]}
    assert dict(control.peerinfo_from_wire(wire).offers) == {"stream": ("s",)}


def test_gossip_skips_bad_entries() -> None:
    good = (NODE, "m", "h", ("tcp://127.0.0.1:1",), None)
    keyed = (NODE, "m", "h", ("tcp://127.0.0.1:1",), "k" * 40)
    wire = control.gossip_to_wire([good, keyed])
    wire += [["short"], [NODE, 1, "h", []], "x", [NODE, "m", "h", [1]], [NODE, "m", "h", [], 7]]
    wire.append([NODE, "m", "h", ["tcp://127.0.0.1:2"]])  # a 4-element entry: no key
    entries, bad = control.gossip_from_wire(wire)
    assert entries == [good, keyed, (NODE, "m", "h", ("tcp://127.0.0.1:2",), None)]
    assert bad == 5
    with pytest.raises(ProtocolError):
        control.gossip_from_wire({"not": "a list"})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=0, max_size=6))
def test_random_frames_raise_only_protocol_errors(frames: list[bytes]) -> None:
    try:
        msgs = control.decode_frames(frames)
    except ProtocolError:
        return
    for m in msgs:
        assert m.error is None or isinstance(m.error, ProtocolError)
        if m.error is None:
            try:
                control.hello_from_wire(m.body)
            except ProtocolError:
                pass
